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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proto::sleeve::Cipher;
use weft_proto::Hello;

/// Oldest and newest control protocol versions this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// See [`PROTOCOL_MIN`].
pub const PROTOCOL_MAX: u16 = 1;
/// The Noise protocol: mutual static keys (XX), the password as PSK mixed in last.
pub const NOISE_PARAMS: &str = "Noise_XXpsk3_25519_AESGCM_SHA256";
const MAGIC: &[u8; 4] = b"weft";
const PREAMBLE_LEN: usize = 10;
const FLAG_ENCRYPTED: u8 = 1;
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
    pub async fn run(&self, s: &mut TcpStream, initiator: bool) -> Result<Secured, HandshakeError> {
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
}

async fn read_frame(s: &mut TcpStream, max: usize) -> Result<Vec<u8>, HandshakeError> {
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

async fn write_frame(s: &mut TcpStream, b: &[u8]) -> Result<(), HandshakeError> {
    let mut out = Vec::with_capacity(b.len() + 2);
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
    s.write_all(&out).await?;
    Ok(())
}

/// Runs version negotiation and (with a PSK) the Noise handshake on `s`.
pub async fn handshake(
    s: &mut TcpStream,
    initiator: bool,
    psk: Option<&[u8; 32]>,
    private_key: &[u8; 32],
) -> Result<Secured, HandshakeError> {
    let mut pre = [0u8; PREAMBLE_LEN];
    pre[..4].copy_from_slice(MAGIC);
    pre[4..6].copy_from_slice(&PROTOCOL_MIN.to_be_bytes());
    pre[6..8].copy_from_slice(&PROTOCOL_MAX.to_be_bytes());
    pre[8] = if psk.is_some() { FLAG_ENCRYPTED } else { 0 };
    s.write_all(&pre).await?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut theirs).await?;
    if &theirs[..4] != MAGIC {
        return Err(HandshakeError::BadPreamble);
    }
    let their_min = u16::from_be_bytes([theirs[4], theirs[5]]);
    let their_max = u16::from_be_bytes([theirs[6], theirs[7]]);
    if PROTOCOL_MAX.min(their_max) < PROTOCOL_MIN.max(their_min) {
        return Err(HandshakeError::Version { our_min: PROTOCOL_MIN, our_max: PROTOCOL_MAX, their_min, their_max });
    }
    let their_encrypted = theirs[8] & FLAG_ENCRYPTED != 0;
    match (psk, their_encrypted) {
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
            })
        }
        (Some(_), true) => {}
    }
    let psk = psk.ok_or_else(|| HandshakeError::Malformed("no psk".into()))?;
    let builder = noise_builder()
        .and_then(|b| Ok(b.local_private_key(private_key)?.psk(3, psk)?))
        .map_err(|e| HandshakeError::Malformed(format!("building Noise state: {e:#}")))?;
    let mut hs = if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let mut buf = vec![0u8; 65535];
    let mut payload = vec![0u8; 65535];
    // XX: -> e ; <- e, ee, s, es ; -> s, se, psk
    for step in 0..3 {
        let ours = (step % 2 == 0) == initiator;
        if ours {
            let n = hs.write_message(&[], &mut buf).map_err(|e| HandshakeError::Malformed(e.to_string()))?;
            write_frame(s, &buf[..n]).await?;
        } else {
            let m = read_frame(s, 65535).await?;
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
                return Err(HandshakeError::Malformed(format!("Noise message {} did not decrypt", step + 1)));
            }
        }
    }
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
