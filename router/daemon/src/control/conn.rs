//! Control connections, one task each: dial or accept, handshake, hello, then a read loop that
//! hands messages to the actor and a write loop that sends what the actor queues (with
//! keepalives). The actor decides whether a connection is kept; these tasks only carry bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use weft_proto::fastpath::Offer;
use weft_proto::identity::Claim;
use weft_proto::router::Session;
use weft_proto::{ConnId, ControlMsg, Hello, SigningKey, Transport};

use super::fastpath::Fastpath;
use super::admission::{Gate, Limits, Refusal, Ticket, Verdict};
use super::handshake::{HandshakeError, Handshaker, SessionHello};
use super::input::{Carrier, ConnUp, Input};
use super::quic::{self, Quic, QuicStream};
use super::records::{ReadError, RecordReader, RecordWriter, MAX_HELLO};
use super::rekey::{self, Incoming, RekeyMsg, Rekeyer};
use super::stats::ControlStats;
use crate::frame::links::Indices;
use crate::frame::udp::canonical;

/// The weft port (TCP control, UDP sleeve).
pub const DEFAULT_PORT: u16 = 6783;
/// Control-connection keepalive and idle timeout.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(10);
const CONTROL_IDLE: Duration = Duration::from_secs(35);
/// How long a connection has for its handshake and hello together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// With `--transport auto`, how long a TCP dial goes alone before QUIC is tried beside it.
const TCP_HEAD_START: Duration = Duration::from_secs(1);
/// Messages queued for one connection before it counts as stuck.
pub const SEND_QUEUE: usize = 1024;

/// What every connection task needs, and nothing more: the keys (only here), what we say about
/// ourselves, sleeve receive indices, counters, and the way to the actor.
pub struct Dialer {
    keys: Handshaker,
    me: Introduction,
    udp_port: u16,
    indices: Indices,
    stats: Arc<ControlStats>,
    inputs: mpsc::Sender<Input>,
    next_conn: AtomicU64,
    rekey_interval: Duration,
    /// The kernel fastpath, whose offer each hello carries.
    fastpath: Option<Arc<Fastpath>>,
    /// The QUIC endpoint on the sleeve port (none with `--transport tcp`).
    quic: Option<Arc<Quic>>,
    /// How we dial.
    choice: TransportChoice,
}

/// How control connections are dialled (`--transport`). Connections from peers are taken
/// either way, except that without QUIC (`tcp`) UDP ones are not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// TCP, and QUIC beside it when TCP has not connected within a second; QUIC only to a
    /// peer's outside UDP address.
    #[default]
    Auto,
    /// TCP only; no QUIC endpoint.
    Tcp,
    /// QUIC only (a firewall that passes only UDP).
    Udp,
}

impl TransportChoice {
    /// Its name, as `--transport` takes it.
    pub fn label(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Tcp => "tcp",
            TransportChoice::Udp => "udp",
        }
    }
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "tcp" => Ok(TransportChoice::Tcp),
            "udp" | "quic" => Ok(TransportChoice::Udp),
            _ => Err(format!("unknown transport {s:?}: use auto, tcp or udp")),
        }
    }
}

/// A control connection's bytes, over TCP or a QUIC stream.
struct Stream {
    rd: Box<dyn AsyncRead + Unpin + Send>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    /// Our end's address.
    local: SocketAddr,
    carrier: Carrier,
    /// The QUIC connection, held while its stream is used; closed when the task ends.
    quic: Option<quinn::Connection>,
}

impl Stream {
    fn tcp(s: TcpStream) -> Result<Stream, String> {
        let _ = s.set_nodelay(true);
        let local = canonical(s.local_addr().map_err(|e| format!("reading the connection's local address: {e}"))?);
        let (rd, wr) = s.into_split();
        Ok(Stream { rd: Box::new(rd), wr: Box::new(wr), local, carrier: Carrier::Tcp, quic: None })
    }

    fn quic(q: QuicStream, remote: SocketAddr, port: u16) -> Result<Stream, String> {
        let local = quic::source_towards(remote, port).map_err(|e| format!("finding our address towards {remote}: {e}"))?;
        Ok(Stream { rd: Box::new(q.recv), wr: Box::new(q.send), local, carrier: Carrier::Quic, quic: Some(q.conn) })
    }
}

impl Dialer {
    /// See the type's docs.
    pub(crate) fn new(
        keys: Handshaker,
        me: Introduction,
        udp_port: u16,
        indices: Indices,
        stats: Arc<ControlStats>,
        inputs: mpsc::Sender<Input>,
    ) -> Self {
        let rekey_interval = rekey::interval_from_env();
        Dialer {
            keys,
            me,
            udp_port,
            indices,
            stats,
            inputs,
            next_conn: AtomicU64::new(1),
            rekey_interval,
            fastpath: None,
            quic: None,
            choice: TransportChoice::Auto,
        }
    }

    /// Dials as `choice` says, with QUIC on `quic` (none for `--transport tcp`).
    pub(crate) fn with_transport(mut self, choice: TransportChoice, quic: Option<Arc<Quic>>) -> Self {
        self.choice = choice;
        self.quic = quic;
        self
    }

    /// Offers `fastpath` on every connection.
    pub(crate) fn with_fastpath(mut self, fastpath: Arc<Fastpath>) -> Self {
        self.fastpath = Some(fastpath);
        self
    }

    fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Relaxed))
    }
}

/// What we say about ourselves on every connection: our claim to our name, and a hello that
/// proves our identity key is at this end of the connection.
pub struct Introduction {
    /// Our identity key.
    pub key: SigningKey,
    /// Our claim (self-signed, or our certificate).
    pub claim: Claim,
    /// Our nickname.
    pub nickname: String,
    /// This start's UID.
    pub uid: u64,
    /// Our TCP port.
    pub listen_port: u16,
}

impl Introduction {
    fn hello(&self, binding: &[u8; 32]) -> Hello {
        Hello::prove(&self.key, self.claim.clone(), self.nickname.clone(), self.uid, self.listen_port, binding)
    }
}

/// Accepts control connections for ever, within the default [`Limits`] on handshakes.
pub async fn accept_loop(dialer: Arc<Dialer>, listener: TcpListener) {
    accept_within(dialer, listener, Limits::default()).await
}

/// Accepts control connections for ever. Each is first put to the admission [`Gate`]: one over
/// its source's bounds (handshakes in progress from it, its budget of failed handshakes) is
/// closed at once, before any crypto, and counted; when all the slots are taken the oldest
/// handshake in progress is closed to make room.
async fn accept_within(dialer: Arc<Dialer>, listener: TcpListener, limits: Limits) {
    let admission = Arc::new(Mutex::new(Admission { gate: Gate::new(limits), evict: HashMap::new(), crowded: false }));
    loop {
        match listener.accept().await {
            Ok((s, remote)) => {
                let remote = canonical(remote);
                let Some(permit) = Permit::ask(&admission, &dialer.stats, remote) else {
                    drop(s);
                    continue;
                };
                let d = dialer.clone();
                tokio::spawn(async move {
                    let r = match Stream::tcp(s) {
                        Ok(s) => connection(d, s, remote, None, Some(permit)).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        debug!(%remote, error = %e, "inbound connection ended");
                    }
                });
            }
            Err(e) => {
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts control connections over QUIC for ever, through the same kind of admission gate as
/// TCP: an attempt over its source's bounds is refused before QUIC's handshake.
pub async fn accept_quic(dialer: Arc<Dialer>, quic: Arc<Quic>) {
    let admission = Arc::new(Mutex::new(Admission { gate: Gate::new(Limits::default()), evict: HashMap::new(), crowded: false }));
    while let Some(incoming) = quic.accept().await {
        let remote = canonical(incoming.remote_address());
        let Some(mut permit) = Permit::ask(&admission, &dialer.stats, remote) else {
            incoming.refuse();
            continue;
        };
        let d = dialer.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let r = match in_time(deadline, Some(&mut permit), quic::answer(incoming)).await {
                Ok(Ok(q)) => match Stream::quic(q, remote, d.me.listen_port) {
                    Ok(s) => connection(d, s, remote, None, Some(permit)).await,
                    Err(e) => Err(e),
                },
                Ok(Err(e)) => Err(e),
                Err(Cut::Timeout) => Err("QUIC handshake timed out".into()),
                Err(Cut::Evicted) => Err("closed during its handshake to make room for a newer one".into()),
            };
            if let Err(e) = r {
                debug!(%remote, error = %e, "inbound QUIC connection ended");
            }
        });
    }
}

/// The gate and the way to close the handshakes it evicts.
struct Admission {
    gate: Gate,
    evict: HashMap<Ticket, oneshot::Sender<()>>,
    /// Evicting since the slots were last less than half full (to log once per episode).
    crowded: bool,
}

fn locked(a: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    // A holder never panics half-way through an update (the gate is plain arithmetic).
    a.lock().unwrap_or_else(|e| e.into_inner())
}

/// An inbound handshake admitted by the gate, from accept until the peer's hello is in. It
/// counts as failed unless [`Permit::succeed`] is called (an error, a time-out, a task dropped
/// half-way); `evicted` fires when a newcomer took its slot.
struct Permit {
    admission: Arc<Mutex<Admission>>,
    stats: Arc<ControlStats>,
    ticket: Ticket,
    evicted: oneshot::Receiver<()>,
    done: bool,
}

impl Permit {
    /// Asks the gate; `None` (counted, and logged once per run of refusals from a source)
    /// means close the connection now.
    fn ask(admission: &Arc<Mutex<Admission>>, stats: &Arc<ControlStats>, remote: SocketAddr) -> Option<Permit> {
        let mut a = locked(admission);
        let verdict = a.gate.admit(remote.ip(), Instant::now());
        let permit = match verdict {
            Verdict::Admit { ticket, evicted } => {
                if let Some(old) = evicted {
                    if let Some(tx) = a.evict.remove(&old) {
                        let _ = tx.send(());
                    }
                    stats.handshake_refused(Refusal::Evicted.label());
                    if !a.crowded {
                        a.crowded = true;
                        warn!(%remote, in_progress = a.gate.in_progress(), "control port crowded: closing the oldest handshakes in progress to make room (counted in weft_handshakes_refused_total)");
                    }
                }
                let (tx, evicted) = oneshot::channel();
                a.evict.insert(ticket, tx);
                Some(Permit { admission: admission.clone(), stats: stats.clone(), ticket, evicted, done: false })
            }
            Verdict::Refuse { why, first } => {
                stats.handshake_refused(why.label());
                if first {
                    warn!(%remote, reason = why.label(), "closing control connections from this source before their handshake (limits on handshakes; counted in weft_handshakes_refused_total)");
                } else {
                    debug!(%remote, reason = why.label(), "control connection refused before its handshake");
                }
                None
            }
        };
        stats.handshakes_in_progress.store(a.gate.in_progress() as u64, Relaxed);
        permit
    }

    /// The peer got through its handshake and hello: its attempt is given back.
    fn succeed(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, ok: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let mut a = locked(&self.admission);
        a.gate.finish(self.ticket, ok);
        a.evict.remove(&self.ticket);
        if a.gate.in_progress() * 2 < a.gate.limits().in_progress {
            a.crowded = false;
        }
        self.stats.handshakes_in_progress.store(a.gate.in_progress() as u64, Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Why a step before the connection is up was cut short.
enum Cut {
    /// The handshake time-out (for handshake and hello together) passed.
    Timeout,
    /// A newcomer took this handshake's slot.
    Evicted,
}

/// Runs `f` until `deadline`, and for an inbound connection until it is evicted.
async fn in_time<F: std::future::Future>(deadline: tokio::time::Instant, permit: Option<&mut Permit>, f: F) -> Result<F::Output, Cut> {
    let f = tokio::time::timeout_at(deadline, f);
    match permit {
        None => f.await.map_err(|_| Cut::Timeout),
        Some(p) => tokio::select! {
            r = f => r.map_err(|_| Cut::Timeout),
            _ = &mut p.evicted => Err(Cut::Evicted),
        },
    }
}

/// Starts the task that dials the addresses the actor asks for, each in a task of its own. The
/// actor holds only the sender: the keys stay with the connection tasks. Unbounded, because the
/// router core asks for each target once until it hears how the dial went.
pub fn dial_on_request(dialer: Arc<Dialer>) -> mpsc::UnboundedSender<(SocketAddr, Transport)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(SocketAddr, Transport)>();
    tokio::spawn(async move {
        while let Some((addr, transport)) = rx.recv().await {
            tokio::spawn(dial(dialer.clone(), addr, transport));
        }
    });
    tx
}

/// Dials `addr` and runs the connection; a failure before it is up is reported to the actor.
async fn dial(dialer: Arc<Dialer>, addr: SocketAddr, transport: Transport) {
    let s = match open(&dialer, addr, transport).await {
        Ok(s) => s,
        Err(e) => return fail(&dialer, addr, e).await,
    };
    if let Err(e) = connection(dialer.clone(), s, addr, Some(addr), None).await {
        fail(&dialer, addr, e).await;
    }
}

/// Opens a stream to `addr`: over TCP, over QUIC, or (`--transport auto`, an address the peer
/// listens on) TCP first and QUIC beside it once TCP has had [`TCP_HEAD_START`], the first to
/// connect winning (a firewall that drops TCP costs a second, not a time-out).
async fn open(d: &Dialer, addr: SocketAddr, transport: Transport) -> Result<Stream, String> {
    let tcp_allowed = transport == Transport::Any && d.choice != TransportChoice::Udp;
    let quic = d.quic.as_ref().filter(|_| d.choice != TransportChoice::Tcp);
    let port = d.me.listen_port;
    let over_quic = |q: Arc<Quic>| async move {
        let s = tokio::time::timeout(DIAL_TIMEOUT, q.dial(addr)).await.map_err(|_| "QUIC: no answer".to_string())??;
        Stream::quic(s, addr, port)
    };
    let over_tcp = async {
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => Stream::tcp(s),
            Ok(Err(e)) => Err(format!("TCP: {e}")),
            Err(_) => Err("TCP: connect timed out".to_string()),
        }
    };
    match (tcp_allowed, quic) {
        (true, None) => over_tcp.await,
        (false, Some(q)) => over_quic(q.clone()).await,
        (false, None) => Err("this address takes only UDP, and QUIC is off (--transport tcp)".into()),
        (true, Some(q)) => {
            tokio::pin!(over_tcp);
            let head = tokio::time::sleep(TCP_HEAD_START);
            let tcp_error = tokio::select! {
                r = &mut over_tcp => match r {
                    Ok(s) => return Ok(s),
                    Err(e) => Some(e),
                },
                _ = head => None,
            };
            let over_quic = over_quic(q.clone());
            tokio::pin!(over_quic);
            if let Some(t) = tcp_error {
                return over_quic.await.map_err(|q| format!("{t}; {q}"));
            }
            tokio::select! {
                r = &mut over_tcp => match r {
                    Ok(s) => Ok(s),
                    Err(t) => over_quic.await.map_err(|q| format!("{t}; {q}")),
                },
                r = &mut over_quic => match r {
                    Ok(s) => {
                        info!(%addr, "TCP has not connected; the control connection goes over QUIC");
                        Ok(s)
                    }
                    Err(q) => over_tcp.await.map_err(|t| format!("{t}; {q}")),
                },
            }
        }
    }
}

async fn fail(dialer: &Dialer, addr: SocketAddr, error: String) {
    let _ = dialer.inputs.send(Input::ConnectFailed { addr, error }).await;
}

/// One control connection from handshake to close. `Err` only for failures
/// before the connection was handed to the actor. An inbound one holds its admission `permit`
/// until the peer's hello is in.
async fn connection(
    d: Arc<Dialer>,
    mut s: Stream,
    remote: SocketAddr,
    target: Option<SocketAddr>,
    mut permit: Option<Permit>,
) -> Result<(), String> {
    let outbound = target.is_some();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let carrier = s.carrier;
    // Held until the task ends; dropping it closes a QUIC connection.
    let _quic = s.quic.take();
    let mut both = tokio::io::join(&mut s.rd, &mut s.wr);
    let secured = match in_time(deadline, permit.as_mut(), d.keys.run(&mut both, outbound)).await {
        Ok(Ok(sec)) => sec,
        Ok(Err(e)) => {
            d.stats.handshake_failed(e.label());
            match &e {
                HandshakeError::WrongPassword | HandshakeError::EncryptionMismatch(_) | HandshakeError::Version { .. } => {
                    warn!(%remote, error = %e, "refused a peer")
                }
                _ => debug!(%remote, error = %e, "handshake failed"),
            }
            return Err(e.to_string());
        }
        Err(Cut::Timeout) => {
            d.stats.handshake_failed("timeout");
            return Err("handshake timed out".into());
        }
        Err(Cut::Evicted) => return Err("closed during its handshake to make room for a newer one".into()),
    };
    let session = Session { local: s.local, binding: secured.binding };
    let Stream { rd, wr, .. } = s;
    let mut reader = RecordReader::new(rd, secured.transport.clone());
    let mut writer = RecordWriter::new(wr, secured.transport.clone());
    let lease = d.indices.lease();
    let fastpath = d.fastpath.as_ref().map_or_else(|| Offer::No("no fastpath".into()), |f| f.offer(remote.ip()));
    let hello = SessionHello { hello: d.me.hello(&secured.binding), udp_port: d.udp_port, sleeve_index: lease.index(), fastpath: fastpath.clone() };
    writer.send(&hello).await.map_err(|e| format!("sending hello: {e:#}"))?;
    // The first message is bounded: nothing big is buffered for a peer whose hello is not in.
    let theirs: SessionHello = match in_time(deadline, permit.as_mut(), reader.recv_bounded(MAX_HELLO)).await {
        Ok(Ok(h)) => h,
        Ok(Err(ReadError::Refused)) => {
            d.stats.handshake_failed("wrong_password");
            warn!(%remote, error = %ReadError::Refused, "refused by a peer");
            return Err(ReadError::Refused.to_string());
        }
        Ok(Err(e)) => {
            d.stats.read_failed(e.label());
            return Err(format!("reading hello: {e}"));
        }
        Err(Cut::Timeout) => {
            d.stats.handshake_failed("timeout");
            return Err("hello timed out".into());
        }
        Err(Cut::Evicted) => return Err("closed before its hello to make room for a newer handshake".into()),
    };
    if theirs.hello.nickname.len() > weft_proto::topology::MAX_NICKNAME {
        return Err("peer nickname too long".into());
    }
    if let Some(p) = permit {
        p.succeed();
    }
    let (tx, mut rx) = mpsc::channel::<ControlMsg>(SEND_QUEUE);
    let (close_tx, mut close_rx) = oneshot::channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    let id = d.conn_id();
    let peer = theirs.hello.name;
    let up = ConnUp {
        id,
        remote,
        target,
        carrier,
        hello: theirs,
        our_fastpath: fastpath,
        session,
        ciphers: (secured.sleeve_send, secured.sleeve_recv),
        our_index: lease,
        tx,
        close: close_tx,
        reply: reply_tx,
    };
    d.inputs.send(Input::ConnUp(Box::new(up))).await.map_err(|_| "router stopping".to_string())?;
    let Some(link) = reply_rx.await.ok().flatten() else {
        writer.shutdown().await;
        return Ok(());
    };
    // Sleeve key rotation (encrypted connections): its messages share the record layer but
    // never reach the actor.
    let rekeyer = secured
        .rekey_root
        .map(|root| Arc::new(Mutex::new(Rekeyer::new(link, root, outbound, d.rekey_interval, Instant::now(), d.stats.clone()))));
    let (rekey_tx, mut rekey_rx) = mpsc::channel::<RekeyMsg>(4);
    let mut rekey_timer = tokio::spawn(rekey::drive(rekeyer.clone(), rekey_tx.clone()));
    let writer_task = tokio::spawn(async move {
        loop {
            let sent = tokio::select! {
                m = tokio::time::timeout(CONTROL_KEEPALIVE, rx.recv()) => match m {
                    Ok(Some(m)) => writer.send(&m).await,
                    Ok(None) => break,
                    Err(_) => writer.send(&ControlMsg::Heartbeat).await,
                },
                Some(k) = rekey_rx.recv() => writer.send(&rekey::tagged(k)).await,
            };
            if sent.is_err() {
                break;
            }
        }
        writer.shutdown().await;
    });
    let reason = loop {
        let next = async { Incoming::decode(&reader.recv_raw().await?) };
        tokio::select! {
            r = tokio::time::timeout(CONTROL_IDLE, next) => match r {
                Ok(Ok(Incoming::Control(msg))) => {
                    if d.inputs.send(Input::Message { id, msg }).await.is_err() {
                        break "router stopping".to_string();
                    }
                }
                Ok(Ok(Incoming::Rekey(m))) => match rekey::handle(rekeyer.as_ref(), m) {
                    Ok(Some(answer)) => {
                        if rekey_tx.send(answer).await.is_err() {
                            break "connection writer stopped".to_string();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(%peer, %remote, error = %e, "sleeve key rotation failed; closing the connection");
                        break e.to_string();
                    }
                },
                Ok(Err(e)) => {
                    if !matches!(e, ReadError::Closed) {
                        d.stats.read_failed(e.label());
                        warn!(%peer, %remote, error = %e, "bad input on control connection; closing it");
                    }
                    break e.to_string();
                }
                Err(_) => break format!("no control traffic for {CONTROL_IDLE:?}"),
            },
            r = &mut rekey_timer => {
                let e = r.map_or_else(|e| format!("key rotation task ended: {e}"), |e| e.to_string());
                warn!(%peer, %remote, error = %e, "sleeve key rotation failed; closing the connection");
                break e;
            }
            _ = &mut close_rx => break "closed by us".to_string(),
        }
    };
    rekey_timer.abort();
    writer_task.abort();
    let _ = d.inputs.send(Input::ConnDown { id, reason }).await;
    Ok(())
}

/// Parses `host`, `host:port`, `ip` or `ip:port` into an address (default port 6783).
pub async fn resolve(peer: &str) -> Result<SocketAddr> {
    if let Ok(a) = peer.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = peer.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if peer.contains(':') { peer.to_string() } else { format!("{peer}:{DEFAULT_PORT}") };
    let mut addrs = tokio::net::lookup_host(&with_port).await.with_context(|| format!("resolving {peer}"))?;
    addrs.next().with_context(|| format!("{peer} resolved to no address"))
}

#[cfg(test)]
mod tests {
    use super::super::handshake::handshake;
    use super::*;
    use tokio::net::TcpSocket;
    use weft_proto::PeerName;

    const PSK: [u8; 32] = [9; 32];

    fn listener_side() -> (Arc<Dialer>, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel(64);
        let key = SigningKey::from_seed(&[1; 32]).expect("key");
        let claim = Claim::self_signed(&key, PeerName::from_u64(1));
        let me = Introduction { key, claim, nickname: "listener".into(), uid: 1, listen_port: 1 };
        let keys = Handshaker::new(Some(PSK), super::super::handshake::generate_keypair().expect("keys").0);
        let stats = Arc::new(ControlStats::default());
        (Arc::new(Dialer::new(keys, me, 1, Indices::new(), stats, tx)), rx)
    }

    async fn connect_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::from((src, 0)))?;
        s.connect(to).await
    }

    /// Connects from `src` as a peer with `psk`, sends a hello and reads the listener's.
    async fn join(src: [u8; 4], to: SocketAddr, psk: [u8; 32]) -> Result<SessionHello, String> {
        let mut s = connect_from(src, to).await.map_err(|e| e.to_string())?;
        let key = super::super::handshake::generate_keypair().map_err(|e| e.to_string())?.0;
        let sec = handshake(&mut s, true, Some(&psk), &key).await.map_err(|e| e.to_string())?;
        let (rd, wr) = s.into_split();
        let mut w = RecordWriter::new(wr, sec.transport.clone());
        let mut r = RecordReader::new(rd, sec.transport);
        let key = SigningKey::from_seed(&[2; 32]).map_err(|e| e.to_string())?;
        let claim = Claim::self_signed(&key, PeerName::from_u64(2));
        let hello = Hello::prove(&key, claim, "joiner".into(), 2, 2, &sec.binding);
        w.send(&SessionHello { hello, udp_port: 2, sleeve_index: 7, fastpath: Offer::No("test".into()) }).await.map_err(|e| format!("{e:#}"))?;
        r.recv::<SessionHello>().await.map_err(|e| e.to_string())
    }

    fn count(stats: &ControlStats, label: &str) -> u64 {
        let i = super::super::stats::REFUSAL_LABELS.iter().position(|l| *l == label).expect("label");
        stats.handshakes_refused[i].load(Relaxed)
    }

    /// 300 connections that never speak, from 20 addresses, take every slot there is; the
    /// slots stay bounded, and a real peer from another address still joins within 5 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_open_connections_stay_bounded_and_a_real_peer_still_joins() {
        let (d, mut inputs) = listener_side();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stats = d.stats.clone();
        let server = tokio::spawn(accept_within(d, l, Limits::default()));
        let mut held = Vec::new();
        for i in 0..300u32 {
            let src = [127, 0, 1, 1 + (i % 20) as u8];
            held.push(connect_from(src, addr).await.expect("connect"));
        }
        // Let the accept loop take them all: each is refused, in progress or evicted.
        let processed = || {
            count(&stats, "source_busy") + count(&stats, "rate_limited") + count(&stats, "evicted") + stats.handshakes_in_progress.load(Relaxed)
        };
        let t0 = Instant::now();
        while processed() < 300 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(processed(), 300);
        let in_progress = stats.handshakes_in_progress.load(Relaxed);
        assert_eq!(in_progress, 64, "every slot taken, and no more");
        let per_source = count(&stats, "source_busy") + count(&stats, "rate_limited");
        assert!(per_source >= 300 - 20 * 8, "connections over their source's bounds are closed: {per_source}");
        assert!(count(&stats, "evicted") >= 20 * 8 - 64, "the oldest made room: {}", count(&stats, "evicted"));

        let t0 = Instant::now();
        let theirs = tokio::time::timeout(Duration::from_secs(5), join([127, 0, 0, 2], addr, PSK))
            .await
            .expect("a real peer joins within 5 s")
            .expect("handshake and hello");
        assert_eq!(theirs.hello.nickname, "listener");
        match tokio::time::timeout(Duration::from_secs(5), inputs.recv()).await {
            Ok(Some(Input::ConnUp(up))) => assert_eq!(up.hello.hello.nickname, "joiner"),
            _ => panic!("the connection did not reach the actor"),
        }
        let took = t0.elapsed();
        assert!(stats.handshakes_in_progress.load(Relaxed) <= 64);
        eprintln!("joined in {took:?} with {in_progress} half-open handshakes in progress");
        server.abort();
        drop(held);
    }

    /// Wrong-password handshakes from one address are answered at the source's rate once its
    /// budget is spent, and a real peer from another address still joins at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_handshakes_from_one_source_are_rate_limited() {
        let (d, mut inputs) = listener_side();
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stats = d.stats.clone();
        let server = tokio::spawn(accept_within(d, l, Limits::default()));
        let t0 = Instant::now();
        let mut answered = 0;
        for _ in 0..100 {
            // A refused connection is closed before our preamble is answered.
            if let Err(e) = join([127, 0, 2, 1], addr, [1; 32]).await {
                if e.contains("password") {
                    answered += 1;
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let wrong = stats.handshake_failures[3].load(Relaxed);
        assert!(answered >= 8, "the first attempts are answered: {answered}");
        assert!((wrong as f64) <= 8.0 + secs.ceil() + 1.0, "{wrong} wrong-password handshakes reached the crypto in {secs:.2} s");
        assert!(count(&stats, "rate_limited") >= 100 - wrong, "the rest were closed before any crypto");
        let theirs = tokio::time::timeout(Duration::from_secs(5), join([127, 0, 2, 2], addr, PSK))
            .await
            .expect("a real peer joins within 5 s")
            .expect("handshake and hello");
        assert_eq!(theirs.hello.nickname, "listener");
        assert!(matches!(inputs.recv().await, Some(Input::ConnUp(_))));
        server.abort();
    }
}
