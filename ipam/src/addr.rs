//! IPv4 CIDR blocks and address arithmetic (addresses as `u32`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 block `addr/prefix`, `addr` aligned to the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    /// First address.
    pub addr: u32,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// The block of `prefix` bits holding `addr` (host bits cleared).
    pub fn new(addr: u32, prefix: u8) -> Result<Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix length {prefix} is more than 32"));
        }
        Ok(Cidr { addr: addr & mask(prefix), prefix })
    }

    /// Number of addresses (as u64: a /0 holds 2^32).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// One past the last address, as u64.
    pub fn end(&self) -> u64 {
        u64::from(self.addr) + self.size()
    }

    /// Whether `a` is inside.
    pub fn contains(&self, a: u32) -> bool {
        a & mask(self.prefix) == self.addr
    }

    /// Whether all of `other` is inside.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The addresses a container may get: all but the network and broadcast
    /// addresses of blocks with more than two addresses. Half-open, as u64.
    pub fn usable(&self) -> (u64, u64) {
        if self.prefix >= 31 {
            (u64::from(self.addr), self.end())
        } else {
            (u64::from(self.addr) + 1, self.end() - 1)
        }
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// Parses `a.b.c.d/n`. Host bits must be clear: `10.32.0.1/12` is refused
    /// (it names an address, not a block).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR block (want e.g. 10.32.0.0/12)"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} in {s:?} is not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{p:?} in {s:?} is not a prefix length"))?;
        let c = Cidr::new(u32::from(addr), prefix)?;
        if c.addr != u32::from(addr) {
            return Err(format!("{s:?} has host bits set; the block is {c}"));
        }
        Ok(c)
    }
}

/// Writes an address for people.
pub fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_contain() {
        let c: Cidr = "10.32.0.0/12".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.size(), 1 << 20);
        assert!(c.contains(u32::from(Ipv4Addr::new(10, 47, 255, 255))));
        assert!(!c.contains(u32::from(Ipv4Addr::new(10, 48, 0, 0))));
        assert!(c.covers(&"10.40.0.0/16".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!("10.32.0.1/12".parse::<Cidr>().is_err());
        assert!("10.32.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert_eq!(c.usable(), (u64::from(c.addr) + 1, c.end() - 1));
        let all: Cidr = "0.0.0.0/0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.end(), 1 << 32);
    }
}
