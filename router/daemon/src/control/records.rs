//! The record layer that carries control messages once a connection is secured: Noise
//! transport records of at most 64 KiB, each carrying part of a stream of length-prefixed
//! postcard messages. See `docs/protocol.md`.

use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::handshake::REFUSE_HANDSHAKE;

/// Largest control message (after reassembly of records).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest first message (the `SessionHello`), read before the peer's hello has been checked:
/// a connection that is not yet up holds no more than this.
pub const MAX_HELLO: usize = 4096;
/// Largest plaintext per Noise transport message (65535 minus the tag).
const MAX_RECORD_PLAIN: usize = 65535 - 16;

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
    rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    transport: Option<Arc<StatelessTransportState>>,
    nonce: u64,
    plain: Vec<u8>,
    record: Vec<u8>,
}

impl RecordReader {
    /// Wraps the read half (of a TCP connection or a QUIC stream).
    pub fn new(rd: impl AsyncRead + Unpin + Send + 'static, transport: Option<Arc<StatelessTransportState>>) -> Self {
        // The record buffer grows to the largest record seen, so a connection that sends only a
        // small hello never costs 64 KiB here.
        RecordReader { rd: BufReader::with_capacity(1 << 16, Box::new(rd)), transport, nonce: 0, plain: Vec::new(), record: Vec::new() }
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
        if self.record.len() < len {
            self.record.resize(len, 0);
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
        self.recv_raw_bounded(MAX_MESSAGE).await
    }

    /// Reads one message's bytes, refusing a message over `max` bytes (and over
    /// [`MAX_MESSAGE`]) before reading its body, and never buffering more than `max` plus one
    /// record.
    pub async fn recv_raw_bounded(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        let max = max.min(MAX_MESSAGE);
        while self.plain.len() < 4 {
            self.fill().await?;
        }
        let len = u32::from_be_bytes([self.plain[0], self.plain[1], self.plain[2], self.plain[3]]) as usize;
        if len > max {
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
        self.recv_bounded(MAX_MESSAGE).await
    }

    /// Reads and decodes one message of at most `max` bytes (see [`Self::recv_raw_bounded`]).
    pub async fn recv_bounded<T: for<'de> Deserialize<'de>>(&mut self, max: usize) -> Result<T, ReadError> {
        let raw = self.recv_raw_bounded(max).await?;
        postcard::from_bytes(&raw).map_err(|e| ReadError::Malformed(e.to_string()))
    }
}

/// Writes control messages; see [`RecordReader`].
pub struct RecordWriter {
    wr: BufWriter<Box<dyn AsyncWrite + Unpin + Send>>,
    transport: Option<Arc<StatelessTransportState>>,
    nonce: u64,
}

impl RecordWriter {
    /// Wraps the write half (of a TCP connection or a QUIC stream).
    pub fn new(wr: impl AsyncWrite + Unpin + Send + 'static, transport: Option<Arc<StatelessTransportState>>) -> Self {
        RecordWriter { wr: BufWriter::with_capacity(1 << 16, Box::new(wr)), transport, nonce: 0 }
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
    use super::super::handshake::{handshake, noise_builder, HandshakeError, Secured};
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

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
        assert!(opener.open(h, b, std::time::Instant::now()).expect("open").is_some());
    }

    /// Complete handshakes per second over loopback, both ends in this process (so the figure
    /// is for both sides' work): `cargo test --release -p weft-router -- --ignored --nocapture
    /// handshake_rate`. Not a pass/fail test; figures go to docs/benchmarks.md.
    #[tokio::test(flavor = "current_thread")]
    #[ignore]
    async fn handshake_rate() {
        let n = 300;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let (rc, rs, _c, _s) = pair(Some([1; 32]), Some([1; 32])).await;
            assert!(rc.is_ok() && rs.is_ok());
        }
        let rate = f64::from(n) / t.elapsed().as_secs_f64();
        eprintln!("{rate:.0} complete Noise XXpsk3 handshakes/s (both ends, one core, loopback TCP)");
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
        let (addr, server) = super::super::handshake::test_responder(None).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
        assert!(matches!(server.await.expect("join"), Err(HandshakeError::BadPreamble)));
    }

    #[tokio::test]
    async fn a_bounded_read_refuses_a_message_over_its_bound_before_its_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, _) = s.into_split();
            let mut r = RecordReader::new(rd, None);
            let first = r.recv_raw_bounded(MAX_HELLO).await;
            let second = r.recv_raw_bounded(MAX_HELLO).await;
            (first, second)
        });
        let c = TcpStream::connect(addr).await.expect("connect");
        let (_, cw) = c.into_split();
        let mut w = RecordWriter::new(cw, None);
        w.send(&vec![1u8; 100]).await.expect("send");
        // Only the length of the second goes out: the reader must not wait for its body.
        let mut head = vec![0u8, 4];
        head.extend_from_slice(&(MAX_HELLO as u32 + 1).to_be_bytes());
        w.wr.write_all(&head).await.expect("write");
        w.wr.flush().await.expect("flush");
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(5), server).await.expect("no stall").expect("join");
        assert_eq!(first.expect("a small message passes").len(), 1 + 100);
        assert!(matches!(second, Err(ReadError::TooLarge(n)) if n == MAX_HELLO + 1), "{second:?}");
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
