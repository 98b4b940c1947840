//! What the Docker plugin remembers, kept in the state directory (dockerd does not replay its
//! requests when the router restarts): the pools it handed out, Docker's networks and
//! endpoints on weft, the addresses it gave, and the containers attached with `weft attach
//! CONTAINER`. Plain data and the checks on it; no I/O but the file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use weft_ipam::Cidr;

/// Pools, networks, endpoints and attachments at most (a bound on what dockerd, or anyone who
/// can reach the plugin socket, can make the router keep).
pub const MAX_ENTRIES: usize = 16_384;

/// A pool: one subnet, given to one Docker network on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pool {
    /// This host's address in the subnet (on the network's bridge), Docker's gateway.
    pub gateway: Ipv4Addr,
}

/// A Docker network on the weft driver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Network {
    /// Its pool's subnet.
    pub subnet: String,
    /// Docker's name for it (learned from the Engine API), which is the weft network's name.
    pub name: Option<String>,
}

/// An endpoint: a port on a weft network's bridge for one container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// Docker's network ID.
    pub network: String,
    /// The weft network.
    pub weft_network: String,
    /// Its segment.
    pub segment: u32,
    /// Host end (on the bridge).
    pub port: String,
    /// Container end, until dockerd moves it.
    pub peer: String,
    /// The container end's MAC.
    pub mac: String,
    /// `IP/PREFIX`.
    pub address: String,
    /// The container, once the Engine API said which.
    pub container: Option<String>,
}

/// An address the IPAM side handed to dockerd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Address {
    /// The ID it is held under in weft's IPAM.
    pub id: String,
    /// Its pool's subnet.
    pub subnet: String,
    /// The container it went to, once known.
    pub container: Option<String>,
    /// Released by dockerd while its container still exists (stopped): kept for it.
    pub parked: bool,
}

/// A container joined with `weft attach CONTAINER`, attached again when it starts again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    /// Docker's name for it (without the `/`).
    pub name: String,
    /// Addresses asked for (`weft attach` arguments), kept for the next start.
    pub cidrs: Vec<String>,
    /// The weft network.
    pub network: Option<String>,
    /// The DNS name.
    pub dns_name: Option<String>,
    /// Interface name inside the container.
    pub ifname: String,
    /// The PID it was attached at (its netns path is `/proc/PID/ns/net`).
    pub pid: Option<i64>,
    /// Its MAC, kept across restarts.
    #[serde(default)]
    pub mac: Option<String>,
}

/// See the module docs.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Book {
    /// By subnet.
    pub pools: BTreeMap<String, Pool>,
    /// By Docker network ID.
    pub networks: BTreeMap<String, Network>,
    /// By Docker endpoint ID.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// By address.
    pub addresses: BTreeMap<Ipv4Addr, Address>,
    /// By container ID.
    pub attached: BTreeMap<String, Attached>,
}

impl Book {
    /// The book in `path`; an empty one when there is none, and when it does not parse (said
    /// in the error, so the caller can warn).
    pub fn load(path: &Path) -> Result<Book, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{} does not parse ({e}): starting with an empty one", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Book::default()),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Writes it to `path` (through a temporary file, so a crash leaves the old or the new).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Whether one more entry fits.
    pub fn full(&self) -> bool {
        self.pools.len() + self.networks.len() + self.endpoints.len() + self.addresses.len() + self.attached.len() >= MAX_ENTRIES
    }

    /// The Docker network name a pool belongs to, for messages.
    pub fn network_of_pool(&self, subnet: &str) -> Option<&str> {
        self.networks.values().find(|n| n.subnet == subnet).and_then(|n| n.name.as_deref())
    }
}

/// Checks a subnet Docker asks for (`--subnet`): inside the mesh's range, a network address,
/// room for a gateway and containers, and no overlap with a pool this host gave another
/// network. Returns the subnet.
pub fn check_pool(range: Cidr, asked: &str, book: &Book) -> Result<Cidr, String> {
    let subnet: Cidr = asked.parse().map_err(|e| format!("--subnet {asked}: {e}"))?;
    if subnet.prefix > 29 {
        return Err(format!("--subnet {asked} is too small: give a /29 or larger"));
    }
    if !range.covers(&subnet) {
        return Err(format!(
            "--subnet {asked} is outside weft's address range {range}: pick a subnet inside it (e.g. {})",
            suggest(range, book).map_or_else(|| range.to_string(), |c| c.to_string())
        ));
    }
    for other in book.pools.keys() {
        let Ok(o) = other.parse::<Cidr>() else { continue };
        if overlaps(o, subnet) {
            let who = book.network_of_pool(other).map_or_else(String::new, |n| format!(" (Docker network {n:?})"));
            return Err(format!(
                "--subnet {asked} overlaps {other}, the subnet of another weft network on this host{who}: pick another (e.g. {})",
                suggest(range, book).map_or_else(|| "a free one".to_owned(), |c| c.to_string())
            ));
        }
    }
    Ok(subnet)
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

fn overlaps(a: Cidr, b: Cidr) -> bool {
    let p = a.prefix.min(b.prefix);
    a.addr & mask(p) == b.addr & mask(p)
}

/// A /24 of the range that no pool here overlaps, for error messages.
pub fn suggest(range: Cidr, book: &Book) -> Option<Cidr> {
    let pools: Vec<Cidr> = book.pools.keys().filter_map(|k| k.parse().ok()).collect();
    let prefix = range.prefix.max(24);
    let count = 1u64 << (prefix - range.prefix);
    // Skip the first block: the default subnet's first addresses are the ones taken first.
    (1..count.min(4096)).map(|i| Cidr { addr: range.addr + (i as u32) * (1 << (32 - u32::from(prefix))), prefix }).find(|c| !pools.iter().any(|p| overlaps(*p, *c)))
}

/// Docker's IDs are 64 lower-case hex digits; a name may be derived from the first ten.
pub fn check_docker_id(what: &str, id: &str) -> Result<(), String> {
    if id.len() >= 12 && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("{what} {id:?} is not a Docker ID (hex digits)"))
    }
}

/// The host end and container end of an endpoint's veth pair.
pub fn port_names(endpoint_id: &str) -> (String, String) {
    let short = &endpoint_id[..10.min(endpoint_id.len())];
    (format!("vw{short}"), format!("vc{short}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Cidr {
        "10.32.0.0/12".parse().unwrap_or(Cidr { addr: 0, prefix: 0 })
    }

    #[test]
    fn pools_must_be_inside_the_range_aligned_and_apart() {
        let mut book = Book::default();
        assert!(check_pool(range(), "10.40.7.0/24", &book).is_ok());
        let e = check_pool(range(), "192.168.1.0/24", &book).err().unwrap_or_default();
        assert!(e.contains("outside weft's address range 10.32.0.0/12"), "{e}");
        assert!(check_pool(range(), "10.0.0.0/8", &book).err().unwrap_or_default().contains("outside"));
        assert!(check_pool(range(), "10.40.7.5/24", &book).err().unwrap_or_default().contains("the block is 10.40.7.0/24"));
        assert!(check_pool(range(), "10.40.7.0/30", &book).err().unwrap_or_default().contains("too small"));
        assert!(check_pool(range(), "10.40.7.0", &book).is_err());
        book.pools.insert("10.40.7.0/24".into(), Pool { gateway: Ipv4Addr::new(10, 40, 7, 1) });
        book.networks.insert("n1".into(), Network { subnet: "10.40.7.0/24".into(), name: Some("red".into()) });
        let e = check_pool(range(), "10.40.7.128/25", &book).err().unwrap_or_default();
        assert!(e.contains("overlaps 10.40.7.0/24") && e.contains("\"red\""), "{e}");
        assert!(check_pool(range(), "10.40.0.0/16", &book).err().unwrap_or_default().contains("overlaps"));
        assert!(check_pool(range(), "10.40.7.0/24", &book).err().unwrap_or_default().contains("overlaps"));
        assert!(check_pool(range(), "10.40.8.0/24", &book).is_ok());
        let s = suggest(range(), &book).unwrap_or(Cidr { addr: 0, prefix: 0 });
        assert!(check_pool(range(), &s.to_string(), &book).is_ok(), "{s}");
    }

    #[test]
    fn ids_and_port_names() {
        let eid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(check_docker_id("endpoint", eid).is_ok());
        assert!(check_docker_id("endpoint", "../../etc").is_err());
        assert!(check_docker_id("endpoint", "ABCDEF0123456").is_err());
        assert!(check_docker_id("endpoint", "abc").is_err());
        let (p, c) = port_names(eid);
        assert_eq!((p.as_str(), c.as_str()), ("vw0123456789", "vc0123456789"));
        assert!(crate::host::guard::is_port_name(&p));
    }

    #[test]
    fn the_book_survives_a_round_trip_and_a_bad_file_is_named() {
        let dir = std::env::temp_dir().join(format!("weft-book-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("docker.json");
        let mut b = Book::default();
        b.pools.insert("10.40.7.0/24".into(), Pool { gateway: Ipv4Addr::new(10, 40, 7, 1) });
        b.attached.insert("abc".into(), Attached { name: "web".into(), cidrs: vec![], network: None, dns_name: None, ifname: "ethwe".into(), pid: Some(7), mac: None });
        b.save(&path).unwrap_or_default();
        assert_eq!(Book::load(&path), Ok(b));
        std::fs::write(&path, b"{not json").unwrap_or_default();
        assert!(Book::load(&path).err().unwrap_or_default().contains("does not parse"));
        assert_eq!(Book::load(&dir.join("none.json")), Ok(Book::default()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
