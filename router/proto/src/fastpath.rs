//! The kernel fastpath's protocol: the heartbeats that travel through the VXLAN path itself,
//! how one end judges that path from them, and the policy that decides towards which peers
//! frames may cross the underlay unencrypted.
//!
//! A heartbeat is an Ethernet frame of type [`ETHERTYPE`] sent into the sender's VXLAN device,
//! addressed to the receiver's bridge MAC: the receiving kernel decapsulates it and its bridge
//! hands it to the host, where the router reads it. So it takes exactly the path container
//! frames take, and a firewall that drops UDP 6784 drops it too. It carries the two names, a
//! sequence number and a tag (HMAC-SHA-256 under a key derived from the control connection's
//! channel binding), so nobody without that connection's secret can make a dead path look alive,
//! and a replayed heartbeat is ignored.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use aws_lc_rs::{constant_time, digest, hmac};
use serde::{Deserialize, Serialize};

use crate::name::PeerName;

/// IEEE 802 "local experimental" EtherType 1, for heartbeats.
pub const ETHERTYPE: u16 = 0x88b5;
/// UDP port of the VXLAN device (kept from Weave).
pub const DEFAULT_PORT: u16 = 6784;
/// The VXLAN network identifier of the weft segment.
pub const VNI: u32 = 0x0077_6674;
/// How often each end sends a heartbeat.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// Silence after which the fastpath counts as broken and traffic falls back to the sleeve.
pub const DEAD: Duration = Duration::from_millis(2500);
/// Heartbeats heard in a row (each within [`DEAD`] of the last) before the path counts as
/// working, at first and after a fallback: a path that flaps is not taken back at once.
pub const STREAK: u32 = 4;

const MAGIC: &[u8; 4] = b"wfhb";
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
/// Signed part of the payload: magic, version, from, to, seq.
const SIGNED_LEN: usize = 4 + 1 + 6 + 6 + 8;
/// Heartbeat payload after the Ethernet header.
pub const PAYLOAD_LEN: usize = SIGNED_LEN + TAG_LEN;
/// Ethernet's minimum frame (without FCS); heartbeats are padded to it.
const MIN_FRAME: usize = 60;
const KEY_LABEL: &[u8] = b"weft fastpath heartbeat v1";

/// Why a received heartbeat was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// Too short, another EtherType, magic or version.
    #[error("malformed heartbeat")]
    Malformed,
    /// Addressed to another router.
    #[error("heartbeat for another router")]
    NotForUs,
    /// From a peer we have no fastpath with.
    #[error("heartbeat from a peer without a fastpath")]
    UnknownPeer,
    /// The tag does not verify under the connection's key.
    #[error("heartbeat with a bad tag")]
    BadTag,
    /// Not newer than the last one accepted.
    #[error("replayed heartbeat")]
    Replayed,
}

impl HeartbeatError {
    /// Labels for counters, in declaration order.
    pub const LABELS: [&'static str; 5] = ["malformed", "not_for_us", "unknown_peer", "bad_tag", "replayed"];

    /// This error's label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// The key that tags one connection's heartbeats (both directions; the names in each say which).
#[derive(Clone)]
pub struct HeartbeatKey(hmac::Key);

impl HeartbeatKey {
    /// Derives the key from the control connection's channel binding value.
    pub fn from_binding(binding: &[u8; 32]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_LABEL);
        ctx.update(&[0]);
        ctx.update(binding);
        HeartbeatKey(hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref()))
    }

    fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        let t = hmac::sign(&self.0, signed);
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(&t.as_ref()[..TAG_LEN]);
        out
    }
}

impl fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeartbeatKey(..)")
    }
}

/// One heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender.
    pub from: PeerName,
    /// Receiver.
    pub to: PeerName,
    /// Increases with every heartbeat on a connection.
    pub seq: u64,
}

/// A heartbeat read from a frame whose tag is not checked yet (the key depends on `from`).
pub struct Unverified<'a> {
    /// What it says.
    pub heartbeat: Heartbeat,
    signed: &'a [u8],
    tag: &'a [u8],
}

impl Unverified<'_> {
    /// Checks the tag under `key`.
    pub fn verify(&self, key: &HeartbeatKey) -> Result<Heartbeat, HeartbeatError> {
        let want = key.tag(self.signed);
        constant_time::verify_slices_are_equal(&want, self.tag).map_err(|_| HeartbeatError::BadTag)?;
        Ok(self.heartbeat)
    }
}

impl Heartbeat {
    /// The whole Ethernet frame, from MAC `src` to MAC `dst`, padded to the minimum size.
    pub fn frame(&self, key: &HeartbeatKey, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::with_capacity(MIN_FRAME);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE.to_be_bytes());
        let start = f.len();
        f.extend_from_slice(MAGIC);
        f.push(VERSION);
        f.extend_from_slice(&self.from.to_bytes());
        f.extend_from_slice(&self.to.to_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        let tag = key.tag(&f[start..]);
        f.extend_from_slice(&tag);
        f.resize(f.len().max(MIN_FRAME), 0);
        f
    }

    /// Reads a received Ethernet frame addressed to `me`; the tag is checked by
    /// [`Unverified::verify`].
    pub fn parse(frame: &[u8], me: PeerName) -> Result<Unverified<'_>, HeartbeatError> {
        let p = frame.get(14..14 + PAYLOAD_LEN).ok_or(HeartbeatError::Malformed)?;
        if frame[12..14] != ETHERTYPE.to_be_bytes() || &p[..4] != MAGIC || p[4] != VERSION {
            return Err(HeartbeatError::Malformed);
        }
        let name = |b: &[u8]| {
            let mut a = [0u8; 6];
            a.copy_from_slice(b);
            PeerName::from_bytes(a)
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&p[17..25]);
        let heartbeat = Heartbeat { from: name(&p[5..11]), to: name(&p[11..17]), seq: u64::from_be_bytes(seq) };
        if heartbeat.to != me {
            return Err(HeartbeatError::NotForUs);
        }
        Ok(Unverified { heartbeat, signed: &p[..SIGNED_LEN], tag: &p[SIGNED_LEN..] })
    }
}

/// One end's view of a connection's fastpath: do we hear the peer's heartbeats, and does the
/// peer (by its reports over the control connection) hear ours.
#[derive(Debug, Clone)]
pub struct Probe {
    port: u16,
    since: Instant,
    last_seq: u64,
    last_heard: Option<Instant>,
    streak: u32,
    hearing: bool,
    peer_hears_us: bool,
}

impl Probe {
    /// A path that has heard nothing yet, probed since `now`; `port` is the peer's UDP port
    /// (for the explanations).
    pub fn new(now: Instant, port: u16) -> Self {
        Probe { port, since: now, last_seq: 0, last_heard: None, streak: 0, hearing: false, peer_hears_us: false }
    }

    /// A verified heartbeat from the peer arrived. Refuses one not newer than the last.
    pub fn heard(&mut self, now: Instant, seq: u64) -> Result<(), HeartbeatError> {
        if seq <= self.last_seq {
            return Err(HeartbeatError::Replayed);
        }
        self.last_seq = seq;
        let in_a_row = self.last_heard.is_some_and(|t| now.saturating_duration_since(t) < DEAD);
        self.streak = if in_a_row { self.streak.saturating_add(1) } else { 1 };
        self.last_heard = Some(now);
        Ok(())
    }

    /// Re-judges whether we hear the peer; returns `Some(hearing)` when that changed (the peer
    /// is told, so it can judge its direction).
    pub fn tick(&mut self, now: Instant) -> Option<bool> {
        let fresh = self.last_heard.is_some_and(|t| now.saturating_duration_since(t) < DEAD);
        if !fresh {
            self.streak = 0;
        }
        let hearing = fresh && self.streak >= STREAK;
        (hearing != self.hearing).then(|| {
            self.hearing = hearing;
            hearing
        })
    }

    /// The peer's report on our heartbeats.
    pub fn peer_reports(&mut self, receiving: bool) {
        self.peer_hears_us = receiving;
    }

    /// Whether the path works both ways, or why not.
    pub fn health(&self, now: Instant) -> Result<(), String> {
        let port = self.port;
        if !self.hearing {
            let silent = self.last_heard.unwrap_or(self.since);
            let secs = now.saturating_duration_since(silent).as_secs();
            return Err(if self.last_heard.is_some() && self.streak > 0 {
                format!("fastpath heartbeats coming back on UDP {port}: {}/{STREAK} heard in a row", self.streak)
            } else if self.last_heard.is_none() && secs < DEAD.as_secs() {
                format!("waiting for fastpath heartbeats on UDP {port}")
            } else {
                format!("no fastpath heartbeat for {secs} s (is UDP {port} blocked?)")
            });
        }
        if !self.peer_hears_us {
            return Err(format!("the peer hears no fastpath heartbeat from us (is UDP {port} blocked towards it?)"));
        }
        Ok(())
    }
}

/// A subnet of the underlay, as given to `--trusted-subnets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    addr: IpAddr,
    prefix: u8,
}

impl Subnet {
    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not a subnet (write it like 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let sub = Subnet { addr: addr.to_canonical(), prefix };
        if !sub.contains(addr) {
            return Err(format!("{s:?}: bad subnet"));
        }
        // The network address itself, so `10.1.2.3/8` means 10.0.0.0/8 and shows so.
        let net = match sub.addr {
            IpAddr::V4(v) => IpAddr::V4((u32::from(v) & mask32(prefix)).into()),
            IpAddr::V6(v) => IpAddr::V6((u128::from(v) & mask128(prefix)).into()),
        };
        Ok(Subnet { addr: net, prefix })
    }
}

fn mask32(p: u8) -> u32 {
    if p == 0 { 0 } else { u32::MAX << (32 - u32::from(p)) }
}

fn mask128(p: u8) -> u128 {
    if p == 0 { 0 } else { u128::MAX << (128 - u32::from(p)) }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses `--trusted-subnets` (comma-separated).
pub fn parse_subnets(s: &str) -> Result<Vec<Subnet>, String> {
    s.split(',').filter(|p| !p.trim().is_empty()).map(str::parse).collect()
}

/// What one end says on a new connection about the fastpath towards the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Offer {
    /// It will carry our frames on its VXLAN device, which listens on this UDP port.
    Yes {
        /// The VXLAN device's UDP port.
        port: u16,
    },
    /// It will not, and why (shown in the other end's status).
    No(String),
}

/// Whether frames towards a peer at `peer_ip` may take the fastpath (plaintext on the underlay):
/// always without a password; with one, only inside `trusted`.
pub fn allowed(encrypted: bool, trusted: &[Subnet], peer_ip: IpAddr) -> Result<(), String> {
    if !encrypted || trusted.iter().any(|s| s.contains(peer_ip)) {
        return Ok(());
    }
    let ip = peer_ip.to_canonical();
    if trusted.is_empty() {
        Err(format!("encrypted mesh and {ip} is not in --trusted-subnets (none given)"))
    } else {
        Err(format!("encrypted mesh and {ip} is not in --trusted-subnets"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerName = PeerName::from_u64(0xaa);
    const B: PeerName = PeerName::from_u64(0xbb);

    fn key(b: u8) -> HeartbeatKey {
        HeartbeatKey::from_binding(&[b; 32])
    }

    #[test]
    fn heartbeats_round_trip_and_refuse_tampering() {
        let k = key(1);
        let hb = Heartbeat { from: A, to: B, seq: 7 };
        let f = hb.frame(&k, [2, 0, 0, 0, 0, 0xbb], [2, 0, 0, 0, 0, 0xaa]);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        let u = Heartbeat::parse(&f, B).expect("parses");
        assert_eq!(u.verify(&k), Ok(hb));
        // Another connection's key.
        assert_eq!(u.verify(&key(2)).err(), Some(HeartbeatError::BadTag));
        // Addressed to someone else.
        assert_eq!(Heartbeat::parse(&f, A).err(), Some(HeartbeatError::NotForUs));
        // Every byte of the signed part and the tag matters.
        for i in 14..14 + PAYLOAD_LEN {
            let mut g = f.clone();
            g[i] ^= 0x01;
            let r = Heartbeat::parse(&g, B).and_then(|u| u.verify(&k));
            assert!(r.is_err(), "flipping byte {i} went unnoticed");
        }
        // Truncated, or another EtherType.
        assert_eq!(Heartbeat::parse(&f[..30], B).err(), Some(HeartbeatError::Malformed));
        let mut g = f.clone();
        g[13] = 0;
        assert_eq!(Heartbeat::parse(&g, B).err(), Some(HeartbeatError::Malformed));
        assert_eq!(Heartbeat::parse(&[], B).err(), Some(HeartbeatError::Malformed));
    }

    #[test]
    fn a_path_works_after_a_streak_falls_back_on_silence_and_comes_back() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut p = Probe::new(t0, 6784);
        assert_eq!(p.health(t0), Err("waiting for fastpath heartbeats on UDP 6784".into()));
        let mut seq = 0;
        let mut beat = |p: &mut Probe, at: u64| {
            seq += 1;
            p.heard(ms(at), seq).expect("fresh");
        };
        for i in 0..STREAK - 1 {
            beat(&mut p, 500 * u64::from(i));
            assert_eq!(p.tick(ms(500 * u64::from(i))), None);
        }
        beat(&mut p, 1500);
        assert_eq!(p.tick(ms(1500)), Some(true));
        // We hear the peer; it does not hear us yet.
        assert!(p.health(ms(1500)).expect_err("down").contains("hears no fastpath heartbeat from us"));
        p.peer_reports(true);
        assert_eq!(p.health(ms(1600)), Ok(()));
        // Silence: still up just before DEAD, down after it, with the time in the reason.
        assert_eq!(p.tick(ms(1500 + 2400)), None);
        assert_eq!(p.tick(ms(1500 + 2600)), Some(false));
        assert_eq!(p.health(ms(6000)), Err("no fastpath heartbeat for 4 s (is UDP 6784 blocked?)".into()));
        // One heartbeat is not enough to come back; a streak is.
        beat(&mut p, 9000);
        assert_eq!(p.tick(ms(9000)), None);
        assert!(p.health(ms(9000)).expect_err("down").contains("1/4 heard in a row"));
        for i in 1..STREAK {
            beat(&mut p, 9000 + 500 * u64::from(i));
        }
        assert_eq!(p.tick(ms(11000)), Some(true));
        assert_eq!(p.health(ms(11000)), Ok(()));
    }

    #[test]
    fn replayed_heartbeats_are_refused() {
        let t0 = Instant::now();
        let mut p = Probe::new(t0, 6784);
        assert_eq!(p.heard(t0, 5), Ok(()));
        assert_eq!(p.heard(t0, 5), Err(HeartbeatError::Replayed));
        assert_eq!(p.heard(t0, 4), Err(HeartbeatError::Replayed));
        assert_eq!(p.heard(t0, 0), Err(HeartbeatError::Replayed));
        assert_eq!(p.heard(t0, 6), Ok(()));
    }

    #[test]
    fn subnets_parse_and_contain() {
        let s: Subnet = "192.168.77.0/24".parse().expect("parses");
        assert!(s.contains("192.168.77.9".parse().expect("ip")));
        assert!(s.contains("::ffff:192.168.77.9".parse().expect("ip")));
        assert!(!s.contains("192.168.78.9".parse().expect("ip")));
        assert!(!s.contains("fd00::1".parse().expect("ip")));
        let host: Subnet = "10.0.0.7".parse().expect("parses");
        assert_eq!(host.to_string(), "10.0.0.7/32");
        assert!(!host.contains("10.0.0.8".parse().expect("ip")));
        let odd: Subnet = "10.1.2.3/9".parse().expect("parses");
        assert_eq!(odd.to_string(), "10.0.0.0/9");
        assert!(odd.contains("10.127.0.1".parse().expect("ip")));
        assert!(!odd.contains("10.128.0.1".parse().expect("ip")));
        let v6: Subnet = "fd00:1::/32".parse().expect("parses");
        assert!(v6.contains("fd00:1:ffff::1".parse().expect("ip")));
        assert!(!v6.contains("fd00:2::1".parse().expect("ip")));
        let all: Subnet = "0.0.0.0/0".parse().expect("parses");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "fd00::/129", "banana", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert_eq!(parse_subnets("10.0.0.0/8, 192.168.0.0/16,").expect("parses").len(), 2);
        assert!(parse_subnets("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn the_policy_keeps_encrypted_meshes_off_untrusted_underlays() {
        let ip = "192.0.2.7".parse().expect("ip");
        assert_eq!(allowed(false, &[], ip), Ok(()));
        assert_eq!(allowed(true, &[], ip), Err("encrypted mesh and 192.0.2.7 is not in --trusted-subnets (none given)".into()));
        let t = parse_subnets("10.0.0.0/8").expect("parses");
        assert_eq!(allowed(true, &t, ip), Err("encrypted mesh and 192.0.2.7 is not in --trusted-subnets".into()));
        let t = parse_subnets("192.0.2.0/24").expect("parses");
        assert_eq!(allowed(true, &t, ip), Ok(()));
    }
}
