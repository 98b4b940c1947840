//! The control channel over UDP: QUIC (quinn) on the sleeve's own port, for peers that TCP does
//! not reach (behind NATs, behind firewalls that pass only UDP 6783).
//!
//! One port: the UDP thread hands every datagram whose first byte has QUIC's fixed bit (0x40) to
//! this endpoint's queue ([`crate::frame::shared::is_quic`]; a sleeve fragment starts with its
//! version, 1), and the endpoint sends from the sleeve socket without waiting. So a QUIC
//! connection and the sleeve towards a peer use the same 5-tuple, and one NAT mapping serves
//! both (the sleeve's heartbeats keep it open; QUIC's keepalives too).
//!
//! Inside QUIC's one bidirectional stream the control connection is the same as over TCP: Noise
//! XXpsk3 handshake, hello, records. QUIC's TLS is only the transport's own encryption: its
//! certificate is made at each start and not checked, because the peer proves who it is inside
//! (the password in the handshake, its identity key in the hello), as on TCP.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::mpsc;

use crate::frame::plane::FramePath;

/// QUIC packets queued between the UDP thread and the endpoint; more are dropped (counted in
/// the frame path's `quic_dropped`), and QUIC resends.
const INBOX: usize = 1024;
/// The ALPN protocol: weft's control channel, version 1.
const ALPN: &[u8] = b"weft-control/1";
/// Connection attempts (QUIC handshakes) in progress that the endpoint holds before it refuses
/// more; the admission gate bounds them per source before any is accepted.
const MAX_INCOMING: usize = 256;
/// A QUIC connection with no packet for this long is gone (as a TCP control connection without
/// traffic for 35 s is).
const IDLE: Duration = Duration::from_secs(35);
/// QUIC keepalives: also refresh the NAT mapping on an idle path.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// The QUIC endpoint on the sleeve port.
pub struct Quic {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// QUIC packets that could not be sent (the socket refused them; QUIC resends).
    pub send_errors: Arc<AtomicU64>,
}

impl Quic {
    /// Starts the endpoint on the frame path's socket (call from inside the runtime).
    pub fn start(frames: Arc<FramePath>) -> Result<Arc<Quic>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (tx, rx) = mpsc::channel::<(Vec<u8>, SocketAddr)>(INBOX);
        frames.set_quic_hook(Box::new(move |d: &[u8], from: SocketAddr| tx.try_send((d.to_vec(), from)).is_ok()));
        let local = frames.local_addr().context("reading the sleeve socket's address")?;
        let send_errors = Arc::new(AtomicU64::new(0));
        let port = Arc::new(SharedPort { frames, local, inbox: Mutex::new(rx), send_errors: send_errors.clone() });
        let mut config = quinn::EndpointConfig::default();
        // Every packet keeps the fixed bit, which is how the UDP thread tells QUIC apart.
        config.grease_quic_bit(false);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(config, Some(server_config(&provider)?), port, Arc::new(quinn::TokioRuntime))
            .context("starting the QUIC endpoint")?;
        Ok(Arc::new(Quic { endpoint, client: client_config(provider)?, send_errors }))
    }

    /// Dials `addr` and opens the control stream.
    pub async fn dial(&self, addr: SocketAddr) -> Result<QuicStream, String> {
        let connecting = self.endpoint.connect_with(self.client.clone(), addr, "weft").map_err(|e| format!("QUIC: {e}"))?;
        let conn = connecting.await.map_err(|e| format!("QUIC: {e}"))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| format!("QUIC: opening the control stream: {e}"))?;
        Ok(QuicStream { conn, send, recv })
    }

    /// The next connection attempt from a peer.
    pub async fn accept(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Closes every connection and stops the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"router stopping");
    }
}

/// Completes an accepted attempt and waits for the peer's control stream.
pub async fn answer(incoming: quinn::Incoming) -> Result<QuicStream, String> {
    let conn = incoming.await.map_err(|e| format!("QUIC: {e}"))?;
    let (send, recv) = conn.accept_bi().await.map_err(|e| format!("QUIC: waiting for the control stream: {e}"))?;
    Ok(QuicStream { conn, send, recv })
}

/// A QUIC connection's control stream.
pub struct QuicStream {
    /// The connection (held for as long as the stream is used; closed when dropped).
    pub conn: quinn::Connection,
    /// Our side of the stream.
    pub send: quinn::SendStream,
    /// The peer's side.
    pub recv: quinn::RecvStream,
}

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE.try_into().context("QUIC idle timeout")?));
    t.keep_alive_interval(Some(KEEPALIVE));
    // One control stream per connection; no datagrams (frames go on the sleeve).
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    Ok(Arc::new(t))
}

fn server_config(provider: &Arc<CryptoProvider>) -> Result<quinn::ServerConfig> {
    let cert = rcgen::generate_simple_self_signed(vec!["weft".to_string()]).context("making the QUIC certificate")?;
    let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("QUIC TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key.into())
        .context("QUIC certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC server crypto")?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(transport()?);
    sc.max_incoming(MAX_INCOMING);
    Ok(sc)
}

fn client_config(provider: Arc<CryptoProvider>) -> Result<quinn::ClientConfig> {
    let verifier = Arc::new(ProvenInside(provider.clone()));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("QUIC TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(transport()?);
    Ok(cc)
}

/// Takes any certificate (the peer proves its identity inside the connection, see the module
/// docs), but checks that the handshake is signed by the certificate's key, as TLS requires.
#[derive(Debug)]
struct ProvenInside(Arc<CryptoProvider>);

impl ServerCertVerifier for ProvenInside {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The sleeve socket as quinn sees it: packets in from the UDP thread's queue, out through the
/// socket directly (it never blocks; a packet the socket refuses is lost and QUIC resends it).
struct SharedPort {
    frames: Arc<FramePath>,
    local: SocketAddr,
    inbox: Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
    send_errors: Arc<AtomicU64>,
}

impl fmt::Debug for SharedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPort").field("local", &self.local).finish()
    }
}

/// Sends never wait, so the socket is always "writable".
#[derive(Debug)]
struct Writable;

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SharedPort {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for d in t.contents.chunks(seg) {
            if let Err(e) = self.frames.send_datagram(t.destination, d) {
                self.send_errors.fetch_add(1, Relaxed);
                tracing::trace!(to = %t.destination, error = %e, "QUIC packet not sent");
            }
        }
        Ok(())
    }

    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            match inbox.poll_recv(cx) {
                Poll::Ready(Some((d, from))) => {
                    let len = d.len().min(bufs[n].len());
                    bufs[n][..len].copy_from_slice(&d[..len]);
                    meta[n] = RecvMeta { addr: from, len, stride: len, ecn: None, dst_ip: None };
                    n += 1;
                }
                Poll::Ready(None) if n == 0 => return Poll::Ready(Err(io::Error::other("the UDP thread stopped"))),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if n == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(n))
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        // The sleeve socket sends with DF: quinn finds the path MTU itself (RFC 8899).
        false
    }
}

/// Our address towards `remote` (the route's source), for what we announce.
pub fn source_towards(remote: SocketAddr, port: u16) -> io::Result<SocketAddr> {
    let any: SocketAddr = if remote.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let s = UdpSocket::bind(any)?;
    s.connect(remote)?;
    Ok(SocketAddr::new(s.local_addr()?.ip(), port))
}
