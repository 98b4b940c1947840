//! Control connections, one task each: dial or accept, handshake, hello, then a read loop that
//! hands messages to the actor and a write loop that sends what the actor queues (with
//! keepalives). The actor decides whether a connection is kept; these tasks only carry bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};
use weft_proto::{ConnId, ControlMsg, Hello};

use super::handshake::{HandshakeError, Handshaker, SessionHello};
use super::input::{ConnUp, Input};
use super::records::{ReadError, RecordReader, RecordWriter};
use super::rekey::{self, Incoming, RekeyMsg, Rekeyer};
use super::stats::ControlStats;
use crate::frame::links::Indices;

/// The weft port (TCP control, UDP sleeve).
pub const DEFAULT_PORT: u16 = 6783;
/// Control-connection keepalive and idle timeout.
const CONTROL_KEEPALIVE: Duration = Duration::from_secs(10);
const CONTROL_IDLE: Duration = Duration::from_secs(35);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued for one connection before it counts as stuck.
pub const SEND_QUEUE: usize = 1024;

/// What every connection task needs, and nothing more: the keys (only here), what we say about
/// ourselves, sleeve receive indices, counters, and the way to the actor.
pub struct Dialer {
    keys: Handshaker,
    hello: Hello,
    udp_port: u16,
    indices: Indices,
    stats: Arc<ControlStats>,
    inputs: mpsc::Sender<Input>,
    next_conn: AtomicU64,
    rekey_interval: Duration,
}

impl Dialer {
    /// See the type's docs.
    pub(crate) fn new(
        keys: Handshaker,
        hello: Hello,
        udp_port: u16,
        indices: Indices,
        stats: Arc<ControlStats>,
        inputs: mpsc::Sender<Input>,
    ) -> Self {
        let rekey_interval = rekey::interval_from_env();
        Dialer { keys, hello, udp_port, indices, stats, inputs, next_conn: AtomicU64::new(1), rekey_interval }
    }

    fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Relaxed))
    }
}

/// Accepts control connections for ever.
pub async fn accept_loop(dialer: Arc<Dialer>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, remote)) => {
                let d = dialer.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(d, s, remote, None).await {
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

/// Starts the task that dials the addresses the actor asks for, each in a task of its own. The
/// actor holds only the sender: the keys stay with the connection tasks. Unbounded, because the
/// router core asks for each target once until it hears how the dial went.
pub fn dial_on_request(dialer: Arc<Dialer>) -> mpsc::UnboundedSender<SocketAddr> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SocketAddr>();
    tokio::spawn(async move {
        while let Some(addr) = rx.recv().await {
            tokio::spawn(dial(dialer.clone(), addr));
        }
    });
    tx
}

/// Dials `addr` and runs the connection; a failure before it is up is reported to the actor.
async fn dial(dialer: Arc<Dialer>, addr: SocketAddr) {
    let s = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&dialer, addr, format!("connect: {e}")).await,
        Err(_) => return fail(&dialer, addr, "connect: timed out".into()).await,
    };
    if let Err(e) = connection(dialer.clone(), s, addr, Some(addr)).await {
        fail(&dialer, addr, e).await;
    }
}

async fn fail(dialer: &Dialer, addr: SocketAddr, error: String) {
    let _ = dialer.inputs.send(Input::ConnectFailed { addr, error }).await;
}

/// One control connection from handshake to close. `Err` only for failures
/// before the connection was handed to the actor.
async fn connection(d: Arc<Dialer>, mut s: TcpStream, remote: SocketAddr, target: Option<SocketAddr>) -> Result<(), String> {
    let _ = s.set_nodelay(true);
    let outbound = target.is_some();
    let secured = match tokio::time::timeout(HANDSHAKE_TIMEOUT, d.keys.run(&mut s, outbound)).await {
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
        Err(_) => {
            d.stats.handshake_failed("timeout");
            return Err("handshake timed out".into());
        }
    };
    let (rd, wr) = s.into_split();
    let mut reader = RecordReader::new(rd, secured.transport.clone());
    let mut writer = RecordWriter::new(wr, secured.transport.clone());
    let lease = d.indices.lease();
    let hello = SessionHello { hello: d.hello.clone(), udp_port: d.udp_port, sleeve_index: lease.index() };
    writer.send(&hello).await.map_err(|e| format!("sending hello: {e:#}"))?;
    let theirs: SessionHello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv()).await {
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
        Err(_) => return Err("hello timed out".into()),
    };
    if theirs.hello.nickname.len() > weft_proto::topology::MAX_NICKNAME {
        return Err("peer nickname too long".into());
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
        hello: theirs,
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
