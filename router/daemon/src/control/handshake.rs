//! The start of a control connection on TCP: version negotiation, the Noise handshake keyed
//! by the network password, and the sleeve keys derived from it. See `docs/protocol.md`.
//!
//! [`Handshaker`] is the only holder of the router's static private key.

use std::sync::Arc;

use anyhow::{Context, Result};
use aws_lc_rs::hkdf;
use serde::{Deserialize, Serialize};
use snow::resolvers::{DefaultResolver, FallbackResolver};
use snow::{Builder, StatelessTransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_proto::sleeve::Cipher;
use weft_proto::Hello;

/// Oldest and newest control protocol versions this build speaks. Version 2 added the nonce to
/// the preamble and made both preambles the Noise prologue; version 3 added the fastpath (the
/// hello's offer, `ControlMsg::FastpathState`); version 4 the `macs` channel, whose lists a
/// version-4 router needs before it takes a peer's frames; version 5 the outside addresses and
/// round trips in topology entries, `ControlMsg::Observed`, and the sleeve's probe and echo
/// records, which a version-4 router would refuse (dropping the heartbeats they ride with).
/// Nothing speaks 1 to 4 any more.
pub const PROTOCOL_MIN: u16 = 5;
/// See [`PROTOCOL_MIN`].
pub const PROTOCOL_MAX: u16 = 5;
/// The Noise protocol: mutual static keys (XX), the password as PSK mixed in last.
pub const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_AESGCM_SHA256";
const MAGIC: &[u8; 4] = b"weft";
/// The part of the preamble every version has: magic, versions, flags, reserved. It is read on
/// its own first, so a peer of another version gets the version error, not a stalled read.
const PREAMBLE_HEAD: usize = 10;
/// Random bytes after the head, fresh for every connection: they make the channel binding of
/// a plaintext connection unique and are part of the Noise prologue.
const PREAMBLE_NONCE: usize = 16;
/// A whole version-2 preamble.
pub(super) const PREAMBLE_LEN: usize = PREAMBLE_HEAD + PREAMBLE_NONCE;
const FLAG_ENCRYPTED: u8 = 1;
/// Largest handshake message we read. Noise XX messages here are 32, 96 and 64 bytes (no
/// payloads); anything longer is malformed, so a connection holds no big buffer before it is
/// authenticated.
const MAX_HANDSHAKE_MESSAGE: usize = 256;
/// Domain label of the plaintext channel binding.
const BINDING_LABEL: &[u8] = b"weft channel binding v2";
/// Refusal code sent in clear after a failed handshake.
pub(super) const REFUSE_HANDSHAKE: u16 = 1;

/// A Noise builder with ring's fast ciphers and snow's X25519.
pub fn noise_builder() -> Result<Builder<'static>> {
    let params = NOISE_PARAMS.parse().context("Noise parameters")?;
    let resolver = FallbackResolver::new(Box::new(snow::resolvers::RingResolver), Box::new(DefaultResolver));
    Ok(Builder::with_resolver(params, Box::new(resolver)))
}

/// A fresh X25519 static key pair: (private, public).
pub fn generate_keypair() -> Result<([u8; 32], [u8; 32])> {
    let kp = noise_builder()?.generate_keypair().context("generating a Noise key pair")?;
    let private: [u8; 32] = kp.private.as_slice().try_into().context("unexpected X25519 private key size from snow")?;
    let public: [u8; 32] = kp.public.as_slice().try_into().context("unexpected X25519 public key size from snow")?;
    Ok((private, public))
}

/// What a connection needs to secure itself: the network key and our static key. The
/// connection tasks hold it; nothing else in the router sees the private key.
pub struct Handshaker {
    psk: Option<[u8; 32]>,
    private_key: [u8; 32],
}

impl Handshaker {
    /// With the PSK derived from the network password (`None`: plaintext) and our static key.
    pub fn new(psk: Option<[u8; 32]>, private_key: [u8; 32]) -> Self {
        Handshaker { psk, private_key }
    }

    /// Whether connections are encrypted.
    pub fn encrypted(&self) -> bool {
        self.psk.is_some()
    }

    /// Runs [`handshake`] with these keys.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(&self, s: &mut S, initiator: bool) -> Result<Secured, HandshakeError> {
        handshake(s, initiator, self.psk.as_ref(), &self.private_key).await
    }
}

/// Why a control connection failed before it was up. Each is counted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The other end does not speak weft (garbage, a port scanner, another protocol).
    #[error("not a weft peer (bad preamble)")]
    BadPreamble,
    /// No common protocol version.
    #[error("no common protocol version: we speak {our_min}..={our_max}, the peer {their_min}..={their_max}; upgrade the older router")]
    Version {
        /// Ours.
        our_min: u16,
        /// Ours.
        our_max: u16,
        /// Theirs.
        their_min: u16,
        /// Theirs.
        their_max: u16,
    },
    /// One side has a password, the other not.
    #[error("{0}")]
    EncryptionMismatch(String),
    /// The Noise handshake failed: the passwords differ (or the peer is not who it claims).
    #[error("handshake failed: the peer's network password differs from ours (check --password on both hosts)")]
    WrongPassword,
    /// A message was malformed.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// Socket error or close.
    #[error("connection error during handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::BadPreamble => "bad_preamble",
            HandshakeError::Version { .. } => "version",
            HandshakeError::EncryptionMismatch(_) => "encryption_mismatch",
            HandshakeError::WrongPassword => "wrong_password",
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::Io(_) => "io",
        }
    }
}

/// What the handshake yields: the record-layer cipher and the sleeve keys.
pub struct Secured {
    /// Noise transport state for the record layer; `None` in plaintext mode.
    pub transport: Option<Arc<StatelessTransportState>>,
    /// Key for sleeve messages we send.
    pub sleeve_send: Cipher,
    /// Key for sleeve messages we receive.
    pub sleeve_recv: Cipher,
    /// The root secret sleeve key rotation starts from (`control::rekey`), when encrypted.
    pub rekey_root: Option<[u8; 32]>,
    /// The peer's static public key, when encrypted.
    pub remote_static: Option<Vec<u8>>,
    /// A value both ends compute alike and no other connection shares, for signing to bind
    /// an identity to this connection: the Noise handshake hash when encrypted (it covers
    /// the prologue, so both preambles, and every handshake message), else SHA-256 over a
    /// label and both preambles (initiator's first), whose nonces make it unique.
    pub binding: [u8; 32],
}

/// What each side announces once the channel is secure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionHello {
    /// Identity and listen port.
    pub hello: Hello,
    /// UDP port for the sleeve.
    pub udp_port: u16,
    /// The index the peer must put in sleeve datagrams to us.
    pub sleeve_index: u32,
    /// Whether the sender will carry this connection's frames on its kernel fastpath.
    pub fastpath: weft_proto::fastpath::Offer,
}

async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, max: usize) -> Result<Vec<u8>, HandshakeError> {
    let len = s.read_u16().await? as usize;
    // A refusal (zero length) only ever follows the last handshake message,
    // which the record layer reads; here an empty message is just malformed.
    if len == 0 {
        return Err(HandshakeError::Malformed("empty handshake message".into()));
    }
    if len > max {
        return Err(HandshakeError::Malformed(format!("handshake message of {len} bytes")));
    }
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).await?;
    Ok(b)
}

async fn write_frame<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<(), HandshakeError> {
    let mut out = Vec::with_capacity(b.len() + 2);
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
    s.write_all(&out).await?;
    Ok(())
}

/// Our preamble: magic, versions, flags, reserved, and a fresh nonce.
fn our_preamble(encrypted: bool) -> [u8; PREAMBLE_LEN] {
    let mut pre = [0u8; PREAMBLE_LEN];
    pre[..4].copy_from_slice(MAGIC);
    pre[4..6].copy_from_slice(&PROTOCOL_MIN.to_be_bytes());
    pre[6..8].copy_from_slice(&PROTOCOL_MAX.to_be_bytes());
    pre[8] = if encrypted { FLAG_ENCRYPTED } else { 0 };
    pre[PREAMBLE_HEAD..].copy_from_slice(&rand::random::<[u8; PREAMBLE_NONCE]>());
    pre
}

/// Checks the head of the peer's preamble (magic and versions) before reading the rest.
fn check_head(theirs: &[u8]) -> Result<(), HandshakeError> {
    if &theirs[..4] != MAGIC {
        return Err(HandshakeError::BadPreamble);
    }
    let their_min = u16::from_be_bytes([theirs[4], theirs[5]]);
    let their_max = u16::from_be_bytes([theirs[6], theirs[7]]);
    if PROTOCOL_MAX.min(their_max) < PROTOCOL_MIN.max(their_min) {
        return Err(HandshakeError::Version { our_min: PROTOCOL_MIN, our_max: PROTOCOL_MAX, their_min, their_max });
    }
    Ok(())
}

/// The plaintext channel binding: SHA-256(label || initiator's preamble || responder's).
fn plaintext_binding(prologue: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(BINDING_LABEL);
    ctx.update(prologue);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Runs version negotiation and (with a PSK) the Noise handshake on `s`.
///
/// Both preambles, the initiator's first, are the Noise prologue: a byte changed on the way
/// (a version, the encryption flag, the nonce) makes the two ends' handshake hashes differ, and
/// the second message fails to decrypt.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    initiator: bool,
    psk: Option<&[u8; 32]>,
    private_key: &[u8; 32],
) -> Result<Secured, HandshakeError> {
    let pre = our_preamble(psk.is_some());
    s.write_all(&pre).await?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut theirs[..PREAMBLE_HEAD]).await?;
    check_head(&theirs)?;
    s.read_exact(&mut theirs[PREAMBLE_HEAD..]).await?;
    let mut prologue = [0u8; 2 * PREAMBLE_LEN];
    let (first, second) = if initiator { (&pre, &theirs) } else { (&theirs, &pre) };
    prologue[..PREAMBLE_LEN].copy_from_slice(first);
    prologue[PREAMBLE_LEN..].copy_from_slice(second);
    let their_encrypted = theirs[8] & FLAG_ENCRYPTED != 0;
    let psk = match (psk, their_encrypted) {
        (Some(_), false) => {
            return Err(HandshakeError::EncryptionMismatch(
                "the peer runs without a password but we have one: refusing a plaintext connection".into(),
            ))
        }
        (None, true) => {
            return Err(HandshakeError::EncryptionMismatch(
                "the peer requires a password but we have none: start this router with --password".into(),
            ))
        }
        (None, false) => {
            return Ok(Secured {
                transport: None,
                sleeve_send: Cipher::Plain,
                sleeve_recv: Cipher::Plain,
                rekey_root: None,
                remote_static: None,
                binding: plaintext_binding(&prologue),
            })
        }
        (Some(psk), true) => psk,
    };
    let builder = noise_builder()
        .and_then(|b| Ok(b.local_private_key(private_key)?.psk(3, psk)?.prologue(&prologue)?))
        .map_err(|e| HandshakeError::Malformed(format!("building Noise state: {e:#}")))?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    // XX: -> e ; <- e, ee, s, es ; -> s, se, psk
    for step in 0..3 {
        let ours = (step % 2 == 0) == initiator;
        if ours {
            let n = hs.write_message(&[], &mut buf).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
            write_frame(s, &buf[..n]).await?;
        } else {
            let m = read_frame(s, MAX_HANDSHAKE_MESSAGE).await?;
            if hs.read_message(&m, &mut payload).is_err() {
                if step == 2 {
                    // The PSK is mixed into the last message: failing here means
                    // the passwords differ. Tell the initiator in clear so it can
                    // say so too, then close.
                    let mut r = [0u8; 4];
                    r[2..].copy_from_slice(&REFUSE_HANDSHAKE.to_be_bytes());
                    let _ = s.write_all(&r).await;
                    return Err(HandshakeError::WrongPassword);
                }
                return Err(HandshakeError::Malformed(format!(
                    "Noise message {} did not decrypt (a preamble changed on the way, or not a weft peer)",
                    step + 1
                )));
            }
        }
    }
    let mut binding = [0u8; 32];
    binding.copy_from_slice(hs.get_handshake_hash());
    let (i2r, r2i) = hs.dangerously_get_raw_split();
    let remote_static = hs.get_remote_static().map(<[u8]>::to_vec);
    let transport = hs.into_stateless_transport_mode().map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    // The sleeve gets its own keys: the raw split keys also key the record
    // layer, and one key must never see two nonce sequences.
    let (send_raw, recv_raw) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
    let (send_info, recv_info): (&[u8], &[u8]) = if initiator {
        (b"weft sleeve initiator to responder", b"weft sleeve responder to initiator")
    } else {
        (b"weft sleeve responder to initiator", b"weft sleeve initiator to responder")
    };
    Ok(Secured {
        transport: Some(Arc::new(transport)),
        sleeve_send: Cipher::aes256gcm(&sleeve_key(&send_raw, send_info)),
        sleeve_recv: Cipher::aes256gcm(&sleeve_key(&recv_raw, recv_info)),
        rekey_root: Some(rekey_root(&i2r, &r2i)),
        remote_static,
        binding,
    })
}

/// The first root secret of sleeve key rotation (`control::rekey`), from the Noise split keys
/// (`k1` initiator to responder, `k2` back):
/// `HKDF-SHA256(salt = "weft sleeve rekey v1", ikm = k1 || k2, info = "weft rekey root")`.
pub fn rekey_root(k1: &[u8; 32], k2: &[u8; 32]) -> [u8; 32] {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(k1);
    ikm[32..].copy_from_slice(k2);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"weft sleeve rekey v1").extract(&ikm);
    ikm.fill(0);
    let mut out = [0u8; 32];
    match prk.expand(&[b"weft rekey root"], hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut out)) {
        Ok(()) => out,
        Err(_) => unreachable!("32 bytes is within HKDF-SHA256's output limit"),
    }
}

/// HKDF-SHA256 (RFC 5869) from a Noise split key to a sleeve key.
fn sleeve_key(raw: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"weft sleeve v1");
    let prk = salt.extract(raw);
    let mut out = [0u8; 32];
    let info = [info];
    match prk.expand(&info, hkdf::HKDF_SHA256).and_then(|okm| okm.fill(&mut out)) {
        Ok(()) => out,
        Err(_) => unreachable!("32 bytes is within HKDF-SHA256's output limit"),
    }
}

/// A responder on a loopback port that takes one connection and runs [`handshake`] on it with
/// `psk` and a fresh key: its address and the handshake's outcome.
#[cfg(test)]
pub(super) async fn test_responder(
    psk: Option<[u8; 32]>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Result<Secured, HandshakeError>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let k = generate_keypair().expect("key pair").0;
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        handshake(&mut s, false, psk.as_ref(), &k).await
    });
    (addr, server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    fn key() -> [u8; 32] {
        generate_keypair().expect("key pair").0
    }

    /// Runs a handshake between two fresh keys over loopback, the bytes from the initiator
    /// passing through `to_responder` and those back through `to_initiator`, each called with
    /// the byte's offset in its direction.
    async fn through(
        psk: Option<[u8; 32]>,
        to_responder: fn(usize, u8) -> u8,
        to_initiator: fn(usize, u8) -> u8,
    ) -> (Result<Secured, HandshakeError>, Result<Secured, HandshakeError>) {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_addr = proxy.local_addr().expect("addr");
        let (ki, kr) = (key(), key());
        let responder = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            handshake(&mut s, false, psk.as_ref(), &kr).await
        });
        let relay = tokio::spawn(async move {
            let (from_i, _) = proxy.accept().await.expect("accept");
            let to_r = TcpStream::connect(server_addr).await.expect("connect");
            let (ir, iw) = from_i.into_split();
            let (rr, rw) = to_r.into_split();
            let pump = |mut rd: tokio::net::tcp::OwnedReadHalf, mut wr: tokio::net::tcp::OwnedWriteHalf, f: fn(usize, u8) -> u8| async move {
                let mut at = 0;
                let mut b = [0u8; 1024];
                while let Ok(n) = rd.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                    for x in &mut b[..n] {
                        *x = f(at, *x);
                        at += 1;
                    }
                    if wr.write_all(&b[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            };
            tokio::join!(pump(ir, rw, to_responder), pump(rr, iw, to_initiator));
        });
        let mut c = TcpStream::connect(proxy_addr).await.expect("connect");
        let ri = handshake(&mut c, true, psk.as_ref(), &ki).await;
        drop(c);
        let rr = responder.await.expect("join");
        relay.abort();
        (ri, rr)
    }

    fn keep(_: usize, b: u8) -> u8 {
        b
    }

    #[tokio::test]
    async fn an_untouched_relay_changes_nothing_and_both_ends_share_the_binding() {
        for psk in [Some([7u8; 32]), None] {
            let (i, r) = through(psk, keep, keep).await;
            let (i, r) = (i.expect("initiator"), r.expect("responder"));
            assert_eq!(i.binding, r.binding, "both ends compute the same binding (psk {})", psk.is_some());
            assert_ne!(i.binding, [0u8; 32]);
            let (i2, r2) = through(psk, keep, keep).await;
            let (i2, r2) = (i2.expect("initiator"), r2.expect("responder"));
            assert_eq!(i2.binding, r2.binding);
            assert_ne!(i.binding, i2.binding, "two connections have different bindings (psk {})", psk.is_some());
        }
    }

    /// A man in the middle that changes one preamble byte, in either direction, at an offset
    /// where the change still negotiates (so only the prologue can catch it), makes both ends
    /// fail.
    #[tokio::test]
    async fn a_preamble_changed_on_the_way_fails_the_handshake() {
        // Lowest version 5 -> 0 (still compatible), the reserved byte, an unknown flag bit, a nonce byte.
        fn min_version(at: usize, b: u8) -> u8 {
            if at == 5 { 0 } else { b }
        }
        fn reserved(at: usize, b: u8) -> u8 {
            if at == 9 { b ^ 0x80 } else { b }
        }
        fn flag(at: usize, b: u8) -> u8 {
            if at == 8 { b | 0x02 } else { b }
        }
        fn nonce(at: usize, b: u8) -> u8 {
            if at == PREAMBLE_HEAD + 3 { b ^ 1 } else { b }
        }
        for f in [min_version, reserved, flag, nonce] {
            let (i, r) = through(Some([7u8; 32]), f, keep).await;
            assert!(i.is_err() && r.is_err(), "tampered towards the responder: {:?} / {:?}", i.err(), r.err());
            let (i, r) = through(Some([7u8; 32]), keep, f).await;
            assert!(i.is_err() && r.is_err(), "tampered towards the initiator: {:?} / {:?}", i.err(), r.err());
        }
        // The encryption flag cleared: the side that sees it refuses a plaintext peer.
        fn no_encryption(at: usize, b: u8) -> u8 {
            if at == 8 { 0 } else { b }
        }
        let (i, r) = through(Some([7u8; 32]), no_encryption, keep).await;
        assert!(matches!(r, Err(HandshakeError::EncryptionMismatch(_))), "{:?}", r.err());
        assert!(i.is_err());
    }

    /// A version-1 peer (10-byte preamble, versions 1..=1) gets the version error, and so do we,
    /// without waiting for bytes it never sends.
    #[tokio::test]
    async fn a_version_1_peer_gets_the_version_error() {
        let (addr, server) = test_responder(Some([1; 32])).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"weft\x00\x01\x00\x01\x01\x00").await.expect("write");
        let mut ours = [0u8; PREAMBLE_HEAD];
        c.read_exact(&mut ours).await.expect("read");
        assert_eq!(&ours[4..8], &[0, 5, 0, 5], "what an old peer reads says 5..=5");
        let r = tokio::time::timeout(Duration::from_secs(5), server).await.expect("no stall").expect("join");
        assert!(
            matches!(r, Err(HandshakeError::Version { their_min: 1, their_max: 1, our_min: 5, our_max: 5 })),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn an_overlong_handshake_message_is_refused_before_it_is_read() {
        let (addr, server) = test_responder(Some([1; 32])).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&our_preamble(true)).await.expect("write");
        c.write_all(&(MAX_HANDSHAKE_MESSAGE as u16 + 1).to_be_bytes()).await.expect("write");
        let r = tokio::time::timeout(Duration::from_secs(5), server).await.expect("no stall").expect("join");
        assert!(matches!(r, Err(HandshakeError::Malformed(ref m)) if m.contains("257")), "{:?}", r.err());
    }
}
