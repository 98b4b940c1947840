//! Control connections on TCP: version negotiation, the Noise handshake keyed
//! by the network password, sleeve key derivation, and the record layer that
//! carries control messages afterwards. See `docs/protocol.md`.

use std::sync::Arc;

use anyhow::{Context, Result};
use aws_lc_rs::hkdf;
use serde::{Deserialize, Serialize};
use snow::resolvers::{DefaultResolver, FallbackResolver};
use snow::{Builder, StatelessTransportState};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
/// Largest control message (after reassembly of records).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest plaintext per Noise transport message (65535 minus the tag).
const MAX_RECORD_PLAIN: usize = 65535 - 16;
/// Refusal code sent in clear after a failed handshake.
const REFUSE_HANDSHAKE: u16 = 1;

/// A Noise builder with ring's fast ciphers and snow's X25519.
pub fn noise_builder() -> Result<Builder<'static>> {
    let params = NOISE_PARAMS.parse().context("Noise parameters")?;
    let resolver = FallbackResolver::new(Box::new(snow::resolvers::RingResolver), Box::new(DefaultResolver));
    Ok(Builder::with_resolver(params, Box::new(resolver)))
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
            return Ok(Secured { transport: None, sleeve_send: Cipher::Plain, sleeve_recv: Cipher::Plain, remote_static: None })
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
        remote_static,
    })
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

/// Why reading a control message failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A record or message exceeded its limit.
    #[error("oversized message ({0} bytes)")]
    TooLarge(usize),
    /// A record failed authentication.
    #[error("record failed authentication")]
    Decrypt,
    /// A message did not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer refused our handshake after we finished our side of it (the
    /// PSK is checked by the responder on the last message): wrong password.
    #[error("the peer refused our handshake: the network passwords differ (check --password on both hosts)")]
    Refused,
    /// Socket error.
    #[error("{0}")]
    Io(std::io::Error),
}

impl ReadError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ReadError::Closed => "closed",
            ReadError::TooLarge(_) => "oversized",
            ReadError::Decrypt => "decrypt",
            ReadError::Malformed(_) => "malformed",
            ReadError::Refused => "wrong_password",
            ReadError::Io(_) => "io",
        }
    }
}

/// Reads control messages: Noise records of at most 64 KiB, each `[u16 len][ciphertext]`,
/// carrying a stream of `[u32 len][postcard message]`.
pub struct RecordReader {
    rd: BufReader<OwnedReadHalf>,
    transport: Option<Arc<StatelessTransportState>>,
    nonce: u64,
    plain: Vec<u8>,
    record: Vec<u8>,
}

impl RecordReader {
    /// Wraps the read half.
    pub fn new(rd: OwnedReadHalf, transport: Option<Arc<StatelessTransportState>>) -> Self {
        RecordReader { rd: BufReader::with_capacity(1 << 16, rd), transport, nonce: 0, plain: Vec::new(), record: vec![0; 65535] }
    }

    async fn fill(&mut self) -> Result<(), ReadError> {
        let len = match self.rd.read_u16().await {
            Ok(l) => l as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
            Err(e) => return Err(ReadError::Io(e)),
        };
        if len == 0 {
            // Never a valid record (a Noise message has at least its tag):
            // the in-clear refusal written by a responder whose handshake failed.
            let code = self.rd.read_u16().await.map_err(ReadError::Io)?;
            return Err(if code == REFUSE_HANDSHAKE { ReadError::Refused } else { ReadError::Malformed(format!("refusal code {code}")) });
        }
        let rec = &mut self.record[..len];
        self.rd.read_exact(rec).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadError::Closed
            } else {
                ReadError::Io(e)
            }
        })?;
        match &self.transport {
            None => self.plain.extend_from_slice(rec),
            Some(t) => {
                let mut out = [0u8; 65535];
                let n = t.read_message(self.nonce, rec, &mut out).map_err(|_| ReadError::Decrypt)?;
                self.nonce += 1;
                self.plain.extend_from_slice(&out[..n]);
            }
        }
        Ok(())
    }

    /// Reads one message's bytes.
    pub async fn recv_raw(&mut self) -> Result<Vec<u8>, ReadError> {
        while self.plain.len() < 4 {
            self.fill().await?;
        }
        let len = u32::from_be_bytes([self.plain[0], self.plain[1], self.plain[2], self.plain[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(ReadError::TooLarge(len));
        }
        while self.plain.len() < 4 + len {
            self.fill().await?;
        }
        let msg = self.plain[4..4 + len].to_vec();
        self.plain.drain(..4 + len);
        Ok(msg)
    }

    /// Reads and decodes one message.
    pub async fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, ReadError> {
        let raw = self.recv_raw().await?;
        postcard::from_bytes(&raw).map_err(|e| ReadError::Malformed(e.to_string()))
    }
}

/// Writes control messages; see [`RecordReader`].
pub struct RecordWriter {
    wr: BufWriter<OwnedWriteHalf>,
    transport: Option<Arc<StatelessTransportState>>,
    nonce: u64,
}

impl RecordWriter {
    /// Wraps the write half.
    pub fn new(wr: OwnedWriteHalf, transport: Option<Arc<StatelessTransportState>>) -> Self {
        RecordWriter { wr: BufWriter::with_capacity(1 << 16, wr), transport, nonce: 0 }
    }

    /// Encodes and sends one message, then flushes.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let body = postcard::to_stdvec(msg).context("encoding control message")?;
        anyhow::ensure!(body.len() <= MAX_MESSAGE, "control message of {} bytes is over the limit", body.len());
        let mut stream = Vec::with_capacity(body.len() + 4);
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
        let mut out = [0u8; 65535];
        for chunk in stream.chunks(MAX_RECORD_PLAIN) {
            let rec: &[u8] = match &self.transport {
                None => chunk,
                Some(t) => {
                    let n = t.write_message(self.nonce, chunk, &mut out).context("encrypting record")?;
                    self.nonce += 1;
                    &out[..n]
                }
            };
            self.wr.write_u16(rec.len() as u16).await?;
            self.wr.write_all(rec).await?;
        }
        self.wr.flush().await?;
        Ok(())
    }

    /// Closes the write side.
    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair(
        psk_a: Option<[u8; 32]>,
        psk_b: Option<[u8; 32]>,
    ) -> (Result<Secured, HandshakeError>, Result<Secured, HandshakeError>, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let ka = noise_builder().expect("b").generate_keypair().expect("kp");
        let kb = noise_builder().expect("b").generate_keypair().expect("kp");
        let pa: [u8; 32] = ka.private.as_slice().try_into().expect("32");
        let pb: [u8; 32] = kb.private.as_slice().try_into().expect("32");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let r = handshake(&mut s, false, psk_b.as_ref(), &pb).await;
            (r, s)
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let rc = handshake(&mut c, true, psk_a.as_ref(), &pa).await;
        let (rs, s) = server.await.expect("join");
        (rc, rs, c, s)
    }

    #[tokio::test]
    async fn same_password_secures_and_carries_messages() {
        let (rc, rs, c, s) = pair(Some([1; 32]), Some([1; 32])).await;
        let (rc, rs) = (rc.expect("client"), rs.expect("server"));
        let (_, cw) = c.into_split();
        let (sr, _) = s.into_split();
        let mut w = RecordWriter::new(cw, rc.transport.clone());
        let mut r = RecordReader::new(sr, rs.transport.clone());
        let big = vec![7u8; 200_000];
        w.send(&big).await.expect("send");
        w.send(&weft_proto::ControlMsg::Heartbeat).await.expect("send");
        assert_eq!(r.recv::<Vec<u8>>().await.expect("recv"), big);
        assert_eq!(r.recv::<weft_proto::ControlMsg>().await.expect("recv"), weft_proto::ControlMsg::Heartbeat);
        // Sleeve keys agree crosswise.
        let mut sealer = weft_proto::sleeve::Sealer::new(rc.sleeve_send, 1);
        let mut opener = weft_proto::sleeve::Opener::new(rs.sleeve_recv);
        let mut msg = vec![2u8];
        let mut wire = Vec::new();
        sealer.seal(&mut msg, 1472, &mut wire);
        let (h, b) = weft_proto::sleeve::Header::parse(&wire).expect("parse");
        assert!(opener.open(h, b).expect("open").is_some());
    }

    #[tokio::test]
    async fn wrong_password_is_refused_on_both_sides() {
        let (rc, rs, c, _s) = pair(Some([1; 32]), Some([2; 32])).await;
        assert!(matches!(rs, Err(HandshakeError::WrongPassword)), "responder: {:?}", rs.err());
        // The initiator finishes its side first (XXpsk3 checks the PSK on the last
        // message) and learns of the refusal when it reads the first record.
        let rc = rc.expect("initiator completes its side");
        let (rd, _) = c.into_split();
        let mut r = RecordReader::new(rd, rc.transport);
        assert!(matches!(r.recv_raw().await, Err(ReadError::Refused)));
    }

    #[tokio::test]
    async fn password_mismatch_with_plaintext_is_refused() {
        let (rc, rs, _c, _s) = pair(None, Some([2; 32])).await;
        assert!(matches!(rc, Err(HandshakeError::EncryptionMismatch(_))));
        assert!(matches!(rs, Err(HandshakeError::EncryptionMismatch(_))));
    }

    #[tokio::test]
    async fn garbage_preamble_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            handshake(&mut s, false, None, &[0; 32]).await
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        assert!(matches!(server.await.expect("join"), Err(HandshakeError::BadPreamble)));
    }

    #[tokio::test]
    async fn oversized_message_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, _) = s.into_split();
            RecordReader::new(rd, None).recv_raw().await
        });
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut rec = vec![0u8, 4];
        rec.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&rec).await.expect("write");
        assert!(matches!(server.await.expect("join"), Err(ReadError::TooLarge(_))));
    }
}
