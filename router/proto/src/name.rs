//! Peer names: 48-bit identifiers written like MAC addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A peer's stable 48-bit name, written `aa:bb:cc:dd:ee:ff`.
///
/// Ordering is by numeric value; it decides duplicate connections and
/// tie-breaks in route computation, so every peer must order names the same way.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct PeerName(u64);

/// The largest value a 48-bit name can hold.
const NAME_MASK: u64 = 0xffff_ffff_ffff;

impl PeerName {
    /// Builds a name from the low 48 bits of `v`.
    pub const fn from_u64(v: u64) -> Self {
        PeerName(v & NAME_MASK)
    }

    /// Builds a name from six bytes (most significant first).
    pub fn from_bytes(b: [u8; 6]) -> Self {
        let mut v = 0u64;
        for x in b {
            v = (v << 8) | u64::from(x);
        }
        PeerName(v)
    }

    /// The name as six bytes, most significant first.
    pub fn to_bytes(self) -> [u8; 6] {
        let v = self.0.to_be_bytes();
        [v[2], v[3], v[4], v[5], v[6], v[7]]
    }

    /// The numeric value.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// A random locally-administered unicast name (as for a MAC address).
    pub fn random(rng: &mut impl rand::RngCore) -> Self {
        let mut b = [0u8; 6];
        rng.fill_bytes(&mut b);
        b[0] = (b[0] & 0xfe) | 0x02;
        Self::from_bytes(b)
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.to_bytes();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a peer name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid peer name {0:?}: expected six hex bytes like 02:1a:2b:3c:4d:5e")]
pub struct ParseNameError(String);

impl FromStr for PeerName {
    type Err = ParseNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseNameError(s.to_owned());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(err());
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() || p.len() > 2 {
                return Err(err());
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(Self::from_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let n = PeerName::from_bytes([0x02, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]);
        assert_eq!(n.to_string(), "02:1a:2b:3c:4d:5e");
        assert_eq!("02:1a:2b:3c:4d:5e".parse::<PeerName>(), Ok(n));
        assert_eq!(n.as_u64(), 0x021a_2b3c_4d5e);
    }

    #[test]
    fn rejects_bad_names() {
        for s in ["", "02:1a", "02:1a:2b:3c:4d:5e:6f", "zz:1a:2b:3c:4d:5e", "021:a:2b:3c:4d:5e"] {
            assert!(s.parse::<PeerName>().is_err(), "{s}");
        }
    }

    #[test]
    fn from_u64_masks_to_48_bits() {
        assert_eq!(PeerName::from_u64(u64::MAX).as_u64(), NAME_MASK);
    }
}
