//! Sleeve key rotation, run by each connection task over its authenticated control connection
//! (see `docs/protocol.md`, "Key rotation").
//!
//! Every [`REKEY_INTERVAL`] (or once a key sealed or opened
//! [`REKEY_AFTER_MESSAGES`](weft_proto::sleeve::REKEY_AFTER_MESSAGES) messages) the side that
//! dialled sends a fresh X25519 public key; the other answers with its own, and both derive the
//! next epoch's sleeve keys and root secret from the shared secret and the current root
//! (HKDF-SHA256), then forget the ephemeral keys and the old root. The order of installation
//! loses nothing: each side installs its new *receive* key before the other can seal with it
//! (the responder before it answers, the initiator before it confirms), and switches its
//! *sealer* only once it knows the peer can open (the initiator on the answer, the responder on
//! the confirmation). The previous receive key opens what is still in flight for
//! [`KEY_OVERLAP`](weft_proto::sleeve::KEY_OVERLAP) after the new one is used, then it is erased.
//!
//! The messages travel as connection-layer messages on the record layer: a message whose first
//! byte is [`REKEY_TAG`] (a `ControlMsg` variant index that is never used) is a [`RekeyMsg`]
//! and never reaches the actor.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::hkdf;
use aws_lc_rs::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::debug;
use weft_proto::sleeve::{Cipher, REKEY_AFTER_MESSAGES};
use weft_proto::{ControlMsg, PeerName};

use super::records::ReadError;
use super::stats::ControlStats;
use crate::frame::links::{lock, Link};

/// How often sleeve keys rotate.
pub const REKEY_INTERVAL: Duration = Duration::from_secs(120);
/// Environment variable that overrides [`REKEY_INTERVAL`], in milliseconds (for tests).
pub const REKEY_INTERVAL_ENV: &str = "WEFT_REKEY_INTERVAL_MS";
/// An exchange not finished in this time closes the connection (reconnecting makes new keys), so
/// no key outlives its limits for want of an answer.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a rekey message on the record layer: as a `ControlMsg` it would be variant
/// 127, which does not exist (and must never be added).
pub const REKEY_TAG: u8 = 0x7f;
const INFO_ROOT: &[u8] = b"weft rekey root";
const INFO_I2R: &[u8] = b"weft sleeve initiator to responder";
const INFO_R2I: &[u8] = b"weft sleeve responder to initiator";

/// The rotation interval: [`REKEY_INTERVAL`] unless [`REKEY_INTERVAL_ENV`] gives another.
pub fn interval_from_env() -> Duration {
    match std::env::var(REKEY_INTERVAL_ENV) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms >= 100 => Duration::from_millis(ms),
            _ => {
                tracing::warn!(value = %v, "{REKEY_INTERVAL_ENV} must be a number of milliseconds, at least 100; rotating every {REKEY_INTERVAL:?}");
                REKEY_INTERVAL
            }
        },
        Err(_) => REKEY_INTERVAL,
    }
}

/// A rekey message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RekeyMsg {
    /// The dialling side's ephemeral public key for `epoch`.
    Init {
        /// The epoch the keys are for: the current one plus one.
        epoch: u32,
        /// X25519 public key.
        public: [u8; 32],
    },
    /// The answer: the other side's ephemeral public key (it installed its receive key).
    Reply {
        /// As in `Init`.
        epoch: u32,
        /// X25519 public key.
        public: [u8; 32],
    },
    /// The dialling side installed its receive key and seals with the new key.
    Confirm {
        /// As in `Init`.
        epoch: u32,
    },
}

/// A message read from a control connection.
pub enum Incoming {
    /// For the actor.
    Control(ControlMsg),
    /// For the connection's [`Rekeyer`].
    Rekey(RekeyMsg),
}

impl Incoming {
    /// Decodes one message of the record layer.
    pub fn decode(raw: &[u8]) -> Result<Incoming, ReadError> {
        let malformed = |e: postcard::Error| ReadError::Malformed(e.to_string());
        if raw.first() == Some(&REKEY_TAG) {
            let (_, m): (u8, RekeyMsg) = postcard::from_bytes(raw).map_err(malformed)?;
            Ok(Incoming::Rekey(m))
        } else {
            postcard::from_bytes(raw).map(Incoming::Control).map_err(malformed)
        }
    }
}

/// Runs the rotation timer of a connection's [`Rekeyer`] (none: plaintext, never returns),
/// sending what it starts on `out`. Returns only when a rotation failed: the connection is then
/// closed.
pub async fn drive(rekeyer: Option<Arc<Mutex<Rekeyer>>>, out: mpsc::Sender<RekeyMsg>) -> RekeyError {
    let Some(k) = rekeyer else { return std::future::pending().await };
    let mut ticker = tokio::time::interval(lock(&k).tick_period());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let step = lock(&k).tick(Instant::now());
        match step {
            Ok(Some(m)) => {
                if out.send(m).await.is_err() {
                    // The writer is gone: the connection is ending anyway.
                    return std::future::pending().await;
                }
            }
            Ok(None) => {}
            Err(e) => return e,
        }
    }
}

/// Hands a rekey message from the peer to the connection's [`Rekeyer`]; returns the answer.
pub fn handle(rekeyer: Option<&Arc<Mutex<Rekeyer>>>, msg: RekeyMsg) -> Result<Option<RekeyMsg>, RekeyError> {
    match rekeyer {
        Some(k) => lock(k).handle(msg, Instant::now()),
        None => Err(RekeyError::Unexpected(msg, 0, "the connection is not encrypted")),
    }
}

/// The wire form of a rekey message: [`REKEY_TAG`], then the message.
pub fn tagged(m: RekeyMsg) -> (u8, RekeyMsg) {
    (REKEY_TAG, m)
}

/// Why a rotation failed; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// A message out of turn, or for another epoch.
    #[error("unexpected rekey message {0:?} (epoch {1}, {2})")]
    Unexpected(RekeyMsg, u32, &'static str),
    /// The peer did not answer in time.
    #[error("the peer did not finish the key rotation to epoch {0} within {REKEY_TIMEOUT:?}")]
    TimedOut(u32),
    /// X25519 failed (a public key of low order) or the random source did.
    #[error("key rotation: {0}")]
    Crypto(&'static str),
}

enum Pending {
    /// We sent `Init` (the dialling side).
    Reply { epoch: u32, private: EphemeralPrivateKey, public: [u8; 32], since: Instant },
    /// We sent `Reply` and hold the new send key until `Confirm`.
    Confirm { epoch: u32, send: Cipher, since: Instant },
}

/// One connection's key rotation: see the module docs.
pub struct Rekeyer {
    link: Arc<Link>,
    peer: PeerName,
    initiator: bool,
    root: [u8; 32],
    /// The newest epoch whose keys we derived.
    epoch: u32,
    /// When that epoch's keys were made.
    since: Instant,
    interval: Duration,
    pending: Option<Pending>,
    stats: Arc<ControlStats>,
    rng: SystemRandom,
}

impl Drop for Rekeyer {
    fn drop(&mut self) {
        self.root = [0; 32];
    }
}

impl Rekeyer {
    /// For the connection whose sleeve is `link`, with the root secret of its handshake;
    /// `initiator` is the side that dialled (it starts the rotations).
    pub fn new(link: Arc<Link>, root: [u8; 32], initiator: bool, interval: Duration, now: Instant, stats: Arc<ControlStats>) -> Self {
        let peer = link.peer;
        Rekeyer { link, peer, initiator, root, epoch: 0, since: now, interval, pending: None, stats, rng: SystemRandom::new() }
    }

    /// How often [`Rekeyer::tick`] wants to run.
    pub fn tick_period(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The newest epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Starts a rotation when one is due (the dialling side), and fails one that took too long.
    pub fn tick(&mut self, now: Instant) -> Result<Option<RekeyMsg>, RekeyError> {
        match &self.pending {
            Some(Pending::Reply { epoch, since, .. } | Pending::Confirm { epoch, since, .. }) => {
                if now.saturating_duration_since(*since) >= REKEY_TIMEOUT {
                    self.stats.sleeve_rekey_failures.fetch_add(1, Relaxed);
                    return Err(RekeyError::TimedOut(*epoch));
                }
                return Ok(None);
            }
            None => {}
        }
        if !self.initiator {
            return Ok(None);
        }
        let sealed = lock(&self.link.sealer).sealed();
        let opened = lock(&self.link.opener).opened();
        let due = now.saturating_duration_since(self.since) >= self.interval;
        if !due && sealed < REKEY_AFTER_MESSAGES && opened < REKEY_AFTER_MESSAGES {
            return Ok(None);
        }
        let epoch = self.epoch.wrapping_add(1);
        let private = EphemeralPrivateKey::generate(&X25519, &self.rng).map_err(|_| RekeyError::Crypto("generating an X25519 key"))?;
        let public = public_of(&private)?;
        debug!(peer = %self.peer, epoch, sealed, opened, "starting sleeve key rotation");
        self.pending = Some(Pending::Reply { epoch, private, public, since: now });
        Ok(Some(RekeyMsg::Init { epoch, public }))
    }

    /// Handles a message from the peer; returns the answer to send, if any.
    pub fn handle(&mut self, msg: RekeyMsg, now: Instant) -> Result<Option<RekeyMsg>, RekeyError> {
        let r = self.step(msg, now);
        if r.is_err() {
            self.stats.sleeve_rekey_failures.fetch_add(1, Relaxed);
        }
        r
    }

    fn step(&mut self, msg: RekeyMsg, now: Instant) -> Result<Option<RekeyMsg>, RekeyError> {
        let next = self.epoch.wrapping_add(1);
        match (msg, self.pending.take()) {
            (RekeyMsg::Init { epoch, public: theirs }, None) if !self.initiator && epoch == next => {
                let private = EphemeralPrivateKey::generate(&X25519, &self.rng).map_err(|_| RekeyError::Crypto("generating an X25519 key"))?;
                let ours = public_of(&private)?;
                let keys = self.derive(private, &theirs, &theirs, &ours, epoch)?;
                // Receive key first: the peer seals with it as soon as it reads our reply.
                lock(&self.link.opener).install(epoch, Cipher::aes256gcm(&keys.i2r));
                self.pending = Some(Pending::Confirm { epoch, send: Cipher::aes256gcm(&keys.r2i), since: now });
                Ok(Some(RekeyMsg::Reply { epoch, public: ours }))
            }
            (RekeyMsg::Reply { epoch, public: theirs }, Some(Pending::Reply { epoch: want, private, public: ours, .. }))
                if self.initiator && epoch == want && epoch == next =>
            {
                let keys = self.derive(private, &theirs, &ours, &theirs, epoch)?;
                // The peer installed its receive key before it replied: we may seal with the new
                // key at once; ours for its messages goes in first.
                lock(&self.link.opener).install(epoch, Cipher::aes256gcm(&keys.r2i));
                lock(&self.link.sealer).rekey(epoch, Cipher::aes256gcm(&keys.i2r));
                self.rotated(epoch, now);
                Ok(Some(RekeyMsg::Confirm { epoch }))
            }
            (RekeyMsg::Confirm { epoch }, Some(Pending::Confirm { epoch: want, send, .. })) if !self.initiator && epoch == want => {
                lock(&self.link.sealer).rekey(epoch, send);
                self.rotated(epoch, now);
                Ok(None)
            }
            (msg, pending) => {
                let state = match pending {
                    None if self.initiator => "this side starts rotations, not the peer",
                    None => "no rotation under way",
                    Some(Pending::Reply { .. }) => "waiting for a reply",
                    Some(Pending::Confirm { .. }) => "waiting for a confirmation",
                };
                Err(RekeyError::Unexpected(msg, self.epoch, state))
            }
        }
    }

    fn rotated(&mut self, epoch: u32, now: Instant) {
        self.since = now;
        self.stats.sleeve_rekeys.fetch_add(1, Relaxed);
        debug!(peer = %self.peer, epoch, "sleeve keys rotated");
    }

    /// The next epoch's keys from our ephemeral key, the peer's public key and the current root;
    /// the root moves on (the old one is overwritten).
    fn derive(&mut self, private: EphemeralPrivateKey, theirs: &[u8; 32], init_pub: &[u8; 32], resp_pub: &[u8; 32], epoch: u32) -> Result<Keys, RekeyError> {
        let keys = agree_ephemeral(private, UnparsedPublicKey::new(&X25519, theirs), RekeyError::Crypto("X25519 agreement failed (bad public key)"), |dh| {
            Ok(derive_keys(&self.root, dh, init_pub, resp_pub, epoch))
        })?;
        self.root = keys.root;
        self.epoch = epoch;
        Ok(keys)
    }
}

fn public_of(private: &EphemeralPrivateKey) -> Result<[u8; 32], RekeyError> {
    let p = private.compute_public_key().map_err(|_| RekeyError::Crypto("computing an X25519 public key"))?;
    p.as_ref().try_into().map_err(|_| RekeyError::Crypto("X25519 public key of unexpected size"))
}

/// One epoch's secrets (wiped when dropped; the ciphers made from them hold their own copy).
struct Keys {
    root: [u8; 32],
    i2r: [u8; 32],
    r2i: [u8; 32],
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.root.fill(0);
        self.i2r.fill(0);
        self.r2i.fill(0);
    }
}

/// Epoch `n`'s keys: `prk = HKDF-Extract(salt = root(n−1), dh || init_pub || resp_pub)`, then
/// `HKDF-Expand(prk, label || n as 4 bytes)` for the labels of the root and each direction.
fn derive_keys(root: &[u8; 32], dh: &[u8], init_pub: &[u8; 32], resp_pub: &[u8; 32], epoch: u32) -> Keys {
    let mut ikm = Vec::with_capacity(dh.len() + 64);
    ikm.extend_from_slice(dh);
    ikm.extend_from_slice(init_pub);
    ikm.extend_from_slice(resp_pub);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, root).extract(&ikm);
    ikm.fill(0);
    let e = epoch.to_be_bytes();
    Keys { root: expand(&prk, INFO_ROOT, &e), i2r: expand(&prk, INFO_I2R, &e), r2i: expand(&prk, INFO_R2I, &e) }
}

fn expand(prk: &hkdf::Prk, label: &[u8], epoch: &[u8; 4]) -> [u8; 32] {
    let mut out = [0u8; 32];
    match prk.expand(&[label, epoch], hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut out)) {
        Ok(()) => out,
        Err(_) => unreachable!("32 bytes is within HKDF-SHA256's output limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::{generate_keypair, handshake, rekey_root, Secured};
    use super::super::records::{RecordReader, RecordWriter};
    use super::*;
    use crate::frame::links::Indices;
    use tokio::net::{TcpListener, TcpStream};
    use weft_proto::sleeve::{Header, MessageBuilder, Sealer, SleeveError, KEY_OVERLAP};

    /// Both ends of an encrypted control connection over loopback, after the handshake.
    async fn connected() -> (Secured, TcpStream, Secured, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (pa, _) = generate_keypair().expect("key");
        let (pb, _) = generate_keypair().expect("key");
        let psk = [3u8; 32];
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let r = handshake(&mut s, false, Some(&psk), &pb).await.expect("responder handshake");
            (r, s)
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let a = handshake(&mut c, true, Some(&psk), &pa).await.expect("initiator handshake");
        let (b, s) = server.await.expect("join");
        (a, c, b, s)
    }

    /// One end: its link, its rotation, its side of the record layer.
    struct End {
        link: Arc<Link>,
        rekeyer: Rekeyer,
        stats: Arc<ControlStats>,
        reader: RecordReader,
        writer: RecordWriter,
    }

    fn end(sec: Secured, s: TcpStream, initiator: bool, ix: &Indices, t0: Instant) -> End {
        let (rd, wr) = s.into_split();
        let lease = ix.lease();
        let peer_index = lease.index() ^ 1;
        let link = Arc::new(Link::new(
            PeerName::from_u64(if initiator { 2 } else { 1 }),
            "127.0.0.1:6783".parse().expect("addr"),
            lease,
            Sealer::new(sec.sleeve_send, peer_index),
            weft_proto::sleeve::Opener::new(sec.sleeve_recv),
            t0,
            1472,
        ));
        let stats = Arc::new(ControlStats::default());
        let root = sec.rekey_root.expect("encrypted connections have a rekey root");
        let rekeyer = Rekeyer::new(link.clone(), root, initiator, Duration::from_secs(120), t0, stats.clone());
        End { link, rekeyer, stats, reader: RecordReader::new(rd, sec.transport.clone()), writer: RecordWriter::new(wr, sec.transport) }
    }

    /// Sends `m` from `from` to `to` over the connection; returns what `to` read.
    async fn carry(from: &mut End, to: &mut End, m: RekeyMsg) -> RekeyMsg {
        from.writer.send(&tagged(m)).await.expect("send");
        let raw = to.reader.recv_raw().await.expect("recv");
        match Incoming::decode(&raw).expect("decode") {
            Incoming::Rekey(m) => m,
            Incoming::Control(c) => panic!("rekey message decoded as {c:?}"),
        }
    }

    /// A heartbeat message sealed on `from`'s link: its one datagram.
    fn datagram(from: &End) -> Vec<u8> {
        let mut msg = Vec::new();
        MessageBuilder::push_heartbeat(&mut msg);
        let mut wire = Vec::new();
        lock(&from.link.sealer).seal(&mut msg, 1472, &mut wire);
        wire
    }

    fn open(to: &End, d: &[u8], now: Instant) -> Result<bool, SleeveError> {
        let (h, b) = Header::parse(d)?;
        lock(&to.link.opener).open(h, b, now).map(|m| m.is_some())
    }

    #[tokio::test]
    async fn rotations_over_a_real_connection_lose_nothing_and_retire_old_keys() {
        let (sa, ca, sb, cb) = connected().await;
        let t0 = Instant::now();
        let ix = Indices::new();
        let (mut a, mut b) = (end(sa, ca, true, &ix, t0), end(sb, cb, false, &ix, t0));
        assert!(open(&b, &datagram(&a), t0).expect("epoch 0 a→b"));
        assert!(open(&a, &datagram(&b), t0).expect("epoch 0 b→a"));
        let ms = Duration::from_millis(1);
        let mut t = t0;
        for epoch in 1..=3u32 {
            // Not due yet: nothing starts; the responder never starts.
            assert!(a.rekeyer.tick(t + ms).expect("tick").is_none());
            t += REKEY_INTERVAL;
            assert!(b.rekeyer.tick(t).expect("tick").is_none());
            // In flight under the old keys while the rotation runs.
            let (old_ab, old_ba) = (datagram(&a), datagram(&b));
            let init = a.rekeyer.tick(t).expect("tick").expect("a rotation is due");
            assert!(matches!(init, RekeyMsg::Init { epoch: e, .. } if e == epoch));
            let init = carry(&mut a, &mut b, init).await;
            let reply = b.rekeyer.handle(init, t).expect("init").expect("a reply");
            // b can open the new key now, but still seals with the old one.
            assert_eq!(lock(&b.link.opener).epoch(), epoch);
            assert_eq!(lock(&b.link.sealer).epoch(), epoch - 1);
            let mid_ba = datagram(&b);
            let reply = carry(&mut b, &mut a, reply).await;
            let confirm = a.rekeyer.handle(reply, t).expect("reply").expect("a confirmation");
            assert_eq!((lock(&a.link.sealer).epoch(), lock(&a.link.opener).epoch()), (epoch, epoch));
            let new_ab = datagram(&a);
            let confirm = carry(&mut a, &mut b, confirm).await;
            assert_eq!(b.rekeyer.handle(confirm, t).expect("confirm"), None);
            assert_eq!(lock(&b.link.sealer).epoch(), epoch);
            let new_ba = datagram(&b);
            // Everything opens, whichever key sealed it, in any order within the overlap.
            t += ms;
            assert!(open(&b, &new_ab, t).expect("new a→b"));
            assert!(open(&a, &new_ba, t).expect("new b→a"));
            assert!(open(&b, &old_ab, t + KEY_OVERLAP - ms).expect("old a→b in the overlap"));
            assert!(open(&a, &old_ba, t).expect("old b→a"));
            assert!(open(&a, &mid_ba, t).expect("b's last old-key message"));
            // After the overlap the previous key opens nothing new.
            t += KEY_OVERLAP;
            let (late_ab, late_ba) = (datagram(&a), datagram(&b));
            assert!(open(&b, &late_ab, t).expect("new key"));
            assert!(open(&a, &late_ba, t).expect("new key"));
            assert_eq!(lock(&a.link.opener).epochs(), vec![epoch]);
            assert_eq!(lock(&b.link.opener).epochs(), vec![epoch]);
            assert_eq!(open(&a, &mid_ba, t), Err(SleeveError::KeyPhase), "old key erased");
        }
        assert_eq!(a.stats.sleeve_rekeys.load(Relaxed), 3);
        assert_eq!(b.stats.sleeve_rekeys.load(Relaxed), 3);
        assert_eq!((a.rekeyer.epoch(), b.rekeyer.epoch()), (3, 3));
    }

    #[tokio::test]
    async fn the_message_count_starts_a_rotation() {
        let (sa, ca, sb, cb) = connected().await;
        let t0 = Instant::now();
        let ix = Indices::new();
        let (mut a, _b) = (end(sa, ca, true, &ix, t0), end(sb, cb, false, &ix, t0));
        assert!(a.rekeyer.tick(t0).expect("tick").is_none());
        // The peer's counter reached REKEY_AFTER_MESSAGES under the current key (one message
        // with that counter stands for them: the test does not seal 2^23): a rotation starts
        // long before the interval.
        let mut opener = weft_proto::sleeve::Opener::new(Cipher::Plain);
        let mut wire = Vec::new();
        Sealer::new(Cipher::Plain, 1).seal(&mut vec![2u8], 1472, &mut wire);
        wire[8..16].copy_from_slice(&(REKEY_AFTER_MESSAGES - 2).to_be_bytes());
        let (h, body) = Header::parse(&wire).expect("parse");
        assert!(opener.open(h, body, t0).expect("open").is_some());
        *lock(&a.link.opener) = opener;
        assert!(a.rekeyer.tick(t0).expect("tick").is_none(), "one message short");
        let mut opener = weft_proto::sleeve::Opener::new(Cipher::Plain);
        wire[8..16].copy_from_slice(&(REKEY_AFTER_MESSAGES - 1).to_be_bytes());
        let (h, body) = Header::parse(&wire).expect("parse");
        assert!(opener.open(h, body, t0).expect("open").is_some());
        *lock(&a.link.opener) = opener;
        assert!(matches!(a.rekeyer.tick(t0), Ok(Some(RekeyMsg::Init { epoch: 1, .. }))));
    }

    #[tokio::test]
    async fn out_of_turn_messages_and_silence_fail_the_rotation() {
        let (sa, ca, sb, cb) = connected().await;
        let t0 = Instant::now();
        let ix = Indices::new();
        let (mut a, mut b) = (end(sa, ca, true, &ix, t0), end(sb, cb, false, &ix, t0));
        // Only the dialling side starts; only the expected message, for the next epoch, is taken.
        let bogus = RekeyMsg::Init { epoch: 1, public: [9; 32] };
        assert!(matches!(a.rekeyer.handle(bogus, t0), Err(RekeyError::Unexpected(..))));
        assert!(matches!(b.rekeyer.handle(RekeyMsg::Confirm { epoch: 1 }, t0), Err(RekeyError::Unexpected(..))));
        assert!(matches!(b.rekeyer.handle(RekeyMsg::Init { epoch: 2, public: [9; 32] }, t0), Err(RekeyError::Unexpected(..))));
        // A public key of low order (all zero) gives no shared secret.
        assert!(matches!(b.rekeyer.handle(RekeyMsg::Init { epoch: 1, public: [0; 32] }, t0), Err(RekeyError::Crypto(_))));
        assert_eq!(lock(&b.link.opener).epoch(), 0, "nothing installed");
        // A peer that never answers: the connection is given up after REKEY_TIMEOUT.
        let t = t0 + REKEY_INTERVAL;
        assert!(a.rekeyer.tick(t).expect("tick").is_some());
        assert!(a.rekeyer.tick(t + REKEY_TIMEOUT - Duration::from_millis(1)).expect("still waiting").is_none());
        assert!(matches!(a.rekeyer.tick(t + REKEY_TIMEOUT), Err(RekeyError::TimedOut(1))));
        assert_eq!(a.stats.sleeve_rekey_failures.load(Relaxed), 2);
        assert_eq!(b.stats.sleeve_rekey_failures.load(Relaxed), 3);
        assert_eq!(lock(&a.link.sealer).epoch(), 0);
        // Control messages still decode as such.
        let raw = postcard::to_stdvec(&ControlMsg::Heartbeat).expect("encode");
        assert!(matches!(Incoming::decode(&raw), Ok(Incoming::Control(ControlMsg::Heartbeat))));
        let raw = postcard::to_stdvec(&tagged(RekeyMsg::Confirm { epoch: 7 })).expect("encode");
        assert_eq!(raw[0], REKEY_TAG);
        assert!(postcard::from_bytes::<ControlMsg>(&raw).is_err(), "the tag is no ControlMsg variant");
    }

    #[test]
    fn both_sides_derive_the_same_keys_and_each_epoch_differs() {
        let root = rekey_root(&[1; 32], &[2; 32]);
        assert_ne!(root, rekey_root(&[2; 32], &[1; 32]));
        let k1 = derive_keys(&root, &[5; 32], &[6; 32], &[7; 32], 1);
        let k1b = derive_keys(&root, &[5; 32], &[6; 32], &[7; 32], 1);
        assert_eq!((k1.root, k1.i2r, k1.r2i), (k1b.root, k1b.i2r, k1b.r2i));
        assert_ne!(k1.i2r, k1.r2i);
        let k2 = derive_keys(&root, &[5; 32], &[6; 32], &[7; 32], 2);
        assert_ne!(k1.i2r, k2.i2r);
        let k1c = derive_keys(&k1.root, &[5; 32], &[6; 32], &[7; 32], 1);
        assert_ne!(k1.i2r, k1c.i2r, "the root moves on");
    }
}
