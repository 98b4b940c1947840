//! Sleeve: the UDP data path's wire format, encryption and fragmentation.
//!
//! A *message* is a batch of records (Ethernet frames, heartbeats) sealed as
//! one AEAD unit under one counter, then cut into *fragments* that each fit a
//! UDP datagram. All fragments but the last have the same size, so a burst can
//! go out as one GSO send and come back as one GRO receive. See
//! `docs/protocol.md` for the byte layout.

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::replay::{ReplayError, ReplayWindow};
use crate::PeerName;

/// Bytes of clear header in front of every fragment.
pub const HEADER_LEN: usize = 16;
/// Bytes of AEAD tag at the end of an encrypted message.
pub const TAG_LEN: usize = 16;
/// Wire format version in byte 0.
pub const VERSION: u8 = 1;
/// Fragment kinds (byte 1).
pub const KIND_AES256GCM: u8 = 1;
/// A message sent without encryption (network run without a password).
pub const KIND_PLAIN: u8 = 2;
/// Byte 1's top bit: the key phase, the low bit of the key epoch the message was sealed under
/// (see [`Sealer::rekey`], [`Opener::install`]). The other bits are the kind.
pub const KEY_PHASE_BIT: u8 = 0x80;
/// After a newer receive key opened its first message, the previous key still opens messages for
/// this long (what was sealed before the sender switched and is still on its way), then it is
/// erased.
pub const KEY_OVERLAP: Duration = Duration::from_secs(1);
/// A new key is agreed once a key has sealed this many messages, well inside AES-256-GCM's
/// limits: a message is at most [`MAX_SEALED`] bytes (2^13 blocks), so a key sees at most 2^36
/// blocks, which keeps an attacker's advantage at distinguishing below 2^-57 (σ²/2^129; the bound
/// RFC 9001 §6.6 uses for QUIC's 2^23-packet limit). Nonces are counters and never repeat.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 23;
/// Largest number of fragments of one message.
pub const MAX_FRAGMENTS: usize = 255;
/// Partially received messages kept per session; when a new one starts on a full table, the one
/// that started first is dropped.
pub const MAX_PARTIALS: usize = 16;
/// A partially received message is dropped this long after its first fragment arrived. A real
/// message's fragments leave in one GSO send and arrive within milliseconds; by a second, TCP
/// above has long retransmitted.
pub const PARTIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest UDP payload (65 535 − 20 bytes of IPv4 header − 8 of UDP): no fragment is longer.
pub const MAX_DATAGRAM: usize = 65_507;
/// The largest message body (records) a [`Sealer`] seals: a batch is cut at 64 KiB and one frame
/// record (a 64 KiB TSO super-frame and its fixed fields) always fits alone, so this leaves room.
/// A receiver refuses to reassemble more than this plus the tag.
pub const MAX_MESSAGE: usize = 128 * 1024;
/// The largest sealed message a receiver reassembles.
pub const MAX_SEALED: usize = MAX_MESSAGE + TAG_LEN;
/// Bytes of a frame record's fixed part (after the type byte).
pub const FRAME_RECORD_LEN: usize = 6 + 6 + 1 + 1 + VNET_LEN + 4;
/// Bytes of the virtio-net header carried with each frame (offload metadata).
pub const VNET_LEN: usize = 10;
/// Record types.
const REC_FRAME: u8 = 1;
const REC_HEARTBEAT: u8 = 2;
/// A frame of a named network: a frame record followed by the network's segment (u32).
const REC_SEGMENT_FRAME: u8 = 3;
/// A path MTU probe: `[4][u16 size][u32 id]` and padding to the end of the message (see
/// [`crate::pmtu`]).
const REC_PROBE: u8 = 4;
/// A probe's acknowledgement: `[5][u16 size][u32 id]`.
const REC_PROBE_ACK: u8 = 5;
/// An echo request for the round trip: `[6][u64 stamp]`, the sender's clock in microseconds.
const REC_PING: u8 = 6;
/// Its answer, carried by the answerer's next heartbeat message: `[7][u64 stamp][u32 held]`,
/// the request's stamp and how long the answerer held it, in microseconds.
const REC_PONG: u8 = 7;
/// Bytes of a probe or acknowledgement record before any padding.
const PROBE_RECORD_LEN: usize = 1 + 2 + 4;
/// Frame record flag: the frame goes to every peer.
pub const FLAG_BROADCAST: u8 = 1;
/// Hops a frame may take before it is dropped (guards against transient loops).
pub const INITIAL_TTL: u8 = 16;

/// Why a datagram was dropped. Each variant is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SleeveError {
    /// Shorter than a header, or fragment fields out of range.
    #[error("malformed sleeve datagram")]
    Malformed,
    /// Unknown version or kind byte.
    #[error("unknown sleeve version or kind")]
    UnknownKind,
    /// No session has this receiver index.
    #[error("no session for receiver index")]
    UnknownSession,
    /// The counter was seen before.
    #[error("replayed sleeve message")]
    Replay,
    /// The counter is behind the replay window.
    #[error("sleeve message too old")]
    TooOld,
    /// Authentication failed: wrong key, or tampered.
    #[error("sleeve message failed authentication")]
    Auth,
    /// Plaintext arrived on an encrypted session, or the reverse.
    #[error("sleeve encryption mode mismatch")]
    ModeMismatch,
    /// No key for the datagram's key phase: the previous key was erased after its overlap, or
    /// the phase was never installed.
    #[error("no sleeve key for the datagram's key phase")]
    KeyPhase,
    /// A record inside an authentic message did not parse.
    #[error("malformed record in sleeve message")]
    BadRecord,
    /// A fragment's body is empty, longer than a datagram can carry, not the size of the
    /// message's other fragments, or would make the message longer than a sealer produces.
    #[error("sleeve fragment of a size its message cannot have")]
    FragmentSize,
    /// A fragment gives another fragment count than the earlier fragments of its message.
    #[error("sleeve fragment count differs from its message's")]
    FragmentCount,
    /// A partly received message was dropped because it did not complete in time.
    #[error("partly received sleeve message expired")]
    PartialExpired,
    /// A partly received message was dropped to make room for a newer one.
    #[error("partly received sleeve message evicted")]
    PartialEvicted,
}

impl SleeveError {
    /// Every variant, for counters indexed by reason.
    pub const ALL: [SleeveError; 13] = [
        SleeveError::Malformed,
        SleeveError::UnknownKind,
        SleeveError::UnknownSession,
        SleeveError::Replay,
        SleeveError::TooOld,
        SleeveError::Auth,
        SleeveError::ModeMismatch,
        SleeveError::KeyPhase,
        SleeveError::BadRecord,
        SleeveError::FragmentSize,
        SleeveError::FragmentCount,
        SleeveError::PartialExpired,
        SleeveError::PartialEvicted,
    ];

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            SleeveError::Malformed => "malformed",
            SleeveError::UnknownKind => "unknown_kind",
            SleeveError::UnknownSession => "unknown_session",
            SleeveError::Replay => "replay",
            SleeveError::TooOld => "too_old",
            SleeveError::Auth => "auth",
            SleeveError::ModeMismatch => "mode_mismatch",
            SleeveError::KeyPhase => "key_phase",
            SleeveError::BadRecord => "bad_record",
            SleeveError::FragmentSize => "fragment_size",
            SleeveError::FragmentCount => "fragment_count",
            SleeveError::PartialExpired => "partial_expired",
            SleeveError::PartialEvicted => "partial_evicted",
        }
    }
}

impl From<ReplayError> for SleeveError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Replayed => SleeveError::Replay,
            ReplayError::TooOld => SleeveError::TooOld,
        }
    }
}

/// The clear header of one fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// [`KIND_AES256GCM`] or [`KIND_PLAIN`].
    pub kind: u8,
    /// The key phase (0 or 1): the low bit of the sealing key's epoch.
    pub phase: u8,
    /// Index of this fragment, from 0.
    pub frag_index: u8,
    /// Number of fragments of the message, from 1.
    pub frag_count: u8,
    /// The receiver's session index (chosen by the receiver).
    pub receiver: u32,
    /// The message counter (the AEAD nonce).
    pub counter: u64,
}

impl Header {
    /// Parses the header of a fragment and returns it with the fragment's body.
    pub fn parse(buf: &[u8]) -> Result<(Header, &[u8]), SleeveError> {
        if buf.len() < HEADER_LEN {
            return Err(SleeveError::Malformed);
        }
        let kind = buf[1] & !KEY_PHASE_BIT;
        if buf[0] != VERSION || (kind != KIND_AES256GCM && kind != KIND_PLAIN) {
            return Err(SleeveError::UnknownKind);
        }
        let h = Header {
            kind,
            phase: u8::from(buf[1] & KEY_PHASE_BIT != 0),
            frag_index: buf[2],
            frag_count: buf[3],
            receiver: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            counter: u64::from_be_bytes([
                buf[8], buf[9], buf[10], buf[11], buf[12], buf[13], buf[14], buf[15],
            ]),
        };
        if h.frag_count == 0 || h.frag_index >= h.frag_count {
            return Err(SleeveError::Malformed);
        }
        Ok((h, &buf[HEADER_LEN..]))
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) {
        out[0] = VERSION;
        out[1] = self.kind | if self.phase & 1 != 0 { KEY_PHASE_BIT } else { 0 };
        out[2] = self.frag_index;
        out[3] = self.frag_count;
        out[4..8].copy_from_slice(&self.receiver.to_be_bytes());
        out[8..16].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// The authenticated data: the header with the fragment fields zeroed,
    /// identical for every fragment of a message (the key phase is authenticated).
    fn aad(&self) -> [u8; HEADER_LEN] {
        let mut a = [0u8; HEADER_LEN];
        Header { frag_index: 0, frag_count: 0, ..*self }.emit(&mut a);
        a
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Key material for one direction of a session.
pub enum Cipher {
    /// No encryption (no password set).
    Plain,
    /// AES-256-GCM with the given key.
    Aes256Gcm(Box<LessSafeKey>),
}

impl Cipher {
    /// An AES-256-GCM cipher from 32 bytes of key.
    pub fn aes256gcm(key: &[u8; 32]) -> Self {
        // 32 bytes is always a valid AES-256 key.
        match UnboundKey::new(&AES_256_GCM, key) {
            Ok(k) => Cipher::Aes256Gcm(Box::new(LessSafeKey::new(k))),
            Err(_) => unreachable!("AES-256 accepts any 32-byte key"),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Cipher::Plain => KIND_PLAIN,
            Cipher::Aes256Gcm(_) => KIND_AES256GCM,
        }
    }
}

/// The sending half of a session: seals messages for one peer.
pub struct Sealer {
    cipher: Cipher,
    receiver: u32,
    next_counter: u64,
    epoch: u32,
}

impl Sealer {
    /// `receiver` is the index the peer asked us to put in our datagrams. The key is epoch 0's.
    pub fn new(cipher: Cipher, receiver: u32) -> Self {
        Sealer { cipher, receiver, next_counter: 0, epoch: 0 }
    }

    /// Seals from now on with `cipher`, the key of `epoch` (the previous one is dropped, so it
    /// can seal nothing more); counters start again from 0 under it. Call it only once the peer
    /// installed the matching receive key.
    pub fn rekey(&mut self, epoch: u32, cipher: Cipher) {
        self.cipher = cipher;
        self.epoch = epoch;
        self.next_counter = 0;
    }

    /// The epoch of the key in use.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Messages sealed under the key in use.
    pub fn sealed(&self) -> u64 {
        self.next_counter
    }

    /// Whether messages are encrypted.
    pub fn encrypted(&self) -> bool {
        matches!(self.cipher, Cipher::Aes256Gcm(_))
    }

    /// Seals the message in `msg` (records, see [`MessageBuilder`]) and writes
    /// its fragments, back to back, into `out` (cleared first). Returns the
    /// size of each fragment but the last, which may be shorter: exactly what a
    /// GSO send wants as its segment size.
    ///
    /// `max_datagram` is the largest UDP payload to produce.
    pub fn seal(&mut self, msg: &mut Vec<u8>, max_datagram: usize, out: &mut Vec<u8>) -> usize {
        let counter = self.next_counter;
        self.next_counter += 1;
        let chunk = max_datagram.saturating_sub(HEADER_LEN).max(64);
        let phase = (self.epoch & 1) as u8;
        let mut head =
            Header { kind: self.cipher.kind(), phase, frag_index: 0, frag_count: 1, receiver: self.receiver, counter };
        if let Cipher::Aes256Gcm(key) = &self.cipher {
            let aad = head.aad();
            // Sealing only fails for messages over the AEAD's length limit (64 GiB).
            match key.seal_in_place_separate_tag(nonce(counter), Aad::from(aad), msg) {
                Ok(tag) => msg.extend_from_slice(tag.as_ref()),
                Err(_) => unreachable!("message far below the AES-GCM length limit"),
            }
        }
        let count = msg.len().div_ceil(chunk).clamp(1, MAX_FRAGMENTS);
        // A caller that builds messages with MessageBuilder never exceeds this.
        debug_assert!(msg.len() <= chunk * MAX_FRAGMENTS);
        head.frag_count = count as u8;
        out.clear();
        out.reserve(msg.len() + count * HEADER_LEN);
        for (i, part) in msg.chunks(chunk).take(count).enumerate() {
            head.frag_index = i as u8;
            let at = out.len();
            out.resize(at + HEADER_LEN, 0);
            head.emit(&mut out[at..]);
            out.extend_from_slice(part);
        }
        if msg.is_empty() {
            let mut h = [0u8; HEADER_LEN];
            head.emit(&mut h);
            out.extend_from_slice(&h);
        }
        (HEADER_LEN + chunk).min(out.len())
    }

    /// The largest message body (records) that fits in [`MAX_FRAGMENTS`] fragments of
    /// `max_datagram` bytes, and at most [`MAX_MESSAGE`].
    pub fn max_message(max_datagram: usize) -> usize {
        ((max_datagram.saturating_sub(HEADER_LEN).max(64)) * MAX_FRAGMENTS - TAG_LEN).min(MAX_MESSAGE)
    }
}

/// Partly received messages dropped since the caller last asked (see [`Opener::take_discards`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Discards {
    /// Dropped after [`PARTIAL_TIMEOUT`].
    pub expired: u64,
    /// Dropped to make room for a newer one.
    pub evicted: u64,
}

/// A message some of whose fragments arrived.
struct Partial {
    phase: u8,
    counter: u64,
    count: u8,
    got: usize,
    /// When its first fragment arrived.
    started: Instant,
    /// The size of every fragment but the last, once one of them arrived.
    chunk: Option<usize>,
    /// The size of the last fragment, once it arrived.
    last: Option<usize>,
    /// The fragments but the last, each at `index * chunk` (written in place as they come: no
    /// copy per fragment and none to join them).
    body: Vec<u8>,
    /// The last fragment.
    tail: Vec<u8>,
    /// Which fragments arrived (bit `index`).
    have: [u64; 4],
}

impl Partial {
    /// Checks that a fragment of `len` bytes at `index` fits this message: every fragment but the
    /// last has one size, the last is no longer, and the whole is at most [`MAX_SEALED`]. Returns
    /// the fields to record.
    fn fits(&self, index: u8, len: usize) -> Result<(Option<usize>, Option<usize>), SleeveError> {
        let is_last = index + 1 == self.count;
        let (chunk, last) = if is_last { (self.chunk, Some(len)) } else { (Some(len), self.last) };
        if !is_last && self.chunk.is_some_and(|c| c != len) {
            return Err(SleeveError::FragmentSize);
        }
        if let Some(c) = chunk {
            let before_last = c * (usize::from(self.count) - 1);
            if last.is_some_and(|l| l > c) || before_last + last.unwrap_or(1) > MAX_SEALED {
                return Err(SleeveError::FragmentSize);
            }
        }
        Ok((chunk, last))
    }
}

/// The receiving half of a session: reassembles, authenticates and de-duplicates.
///
/// What is authenticated: the AEAD tag covers a whole *message* (its reassembled bytes, and the
/// header with the fragment fields zeroed as associated data), not each fragment. A fragment is
/// therefore taken into the reassembly table before anything about it can be verified, in
/// encrypted mode too: anyone who can send UDP to this host and knows (or guesses) a receiver
/// index can add fragments. Only a forged *message* is impossible (it fails the tag, and the
/// replay window moves only after the tag verified). So the table is what must hold against
/// spoofing: it is bounded ([`MAX_PARTIALS`]), a partial message expires after
/// [`PARTIAL_TIMEOUT`], a full table drops the partial that *started* first (a spoofer's
/// leftovers, not the real message now arriving), and fragment sizes are checked against what a
/// sealer produces. Each refusal and each dropped partial is counted by its [`SleeveError`].
///
/// Keys rotate (see `docs/protocol.md`, key rotation): the opener holds at most two receive
/// keys, one per key phase, each with its own replay window (counters start from 0 under each
/// key). A datagram is opened with the key of the phase in its header. Once the newest key opened
/// a message, the other is erased [`KEY_OVERLAP`] later, so a key taken from memory then opens
/// nothing sealed before the previous rotation.
pub struct Opener {
    keys: [Option<RecvKey>; 2],
    /// The phase of the newest key.
    newest: usize,
    partials: Vec<Partial>,
    discards: Discards,
}

/// One receive key and what goes with it.
struct RecvKey {
    cipher: Cipher,
    epoch: u32,
    window: ReplayWindow,
    /// Whether it opened a message yet.
    used: bool,
    /// When it is erased (set on the previous key once the next one is used).
    retire_at: Option<Instant>,
}

impl Opener {
    /// A receiver with the given key (epoch 0).
    pub fn new(cipher: Cipher) -> Self {
        let key = RecvKey { cipher, epoch: 0, window: ReplayWindow::default(), used: false, retire_at: None };
        Opener { keys: [Some(key), None], newest: 0, partials: Vec::new(), discards: Discards::default() }
    }

    /// Installs the receive key of `epoch`, in the slot of its phase: the key there before (two
    /// epochs back) is erased, with its partly received messages. Install it before the peer
    /// may seal with it; the current key keeps opening until [`KEY_OVERLAP`] after the new one
    /// opened its first message.
    pub fn install(&mut self, epoch: u32, cipher: Cipher) {
        let phase = (epoch & 1) as usize;
        self.partials.retain(|p| usize::from(p.phase) != phase);
        self.keys[phase] = Some(RecvKey { cipher, epoch, window: ReplayWindow::default(), used: false, retire_at: None });
        self.newest = phase;
    }

    /// The epoch of the newest receive key.
    pub fn epoch(&self) -> u32 {
        self.keys[self.newest].as_ref().map_or(0, |k| k.epoch)
    }

    /// Messages opened under the newest key, as far as its highest counter tells.
    pub fn opened(&self) -> u64 {
        self.keys[self.newest].as_ref().and_then(|k| k.window.highest()).map_or(0, |h| h.saturating_add(1))
    }

    /// The epochs of the keys held now, newest first.
    pub fn epochs(&self) -> Vec<u32> {
        let other = 1 - self.newest;
        [self.newest, other].iter().filter_map(|&i| self.keys[i].as_ref().map(|k| k.epoch)).collect()
    }

    /// Erases keys whose overlap is over (at `now`).
    pub fn retire(&mut self, now: Instant) {
        for k in &mut self.keys {
            if k.as_ref().and_then(|k| k.retire_at).is_some_and(|t| now >= t) {
                *k = None;
            }
        }
    }

    /// Takes one fragment that arrived at `now`. Returns `Ok(Some(records))` when it completed an
    /// authentic, fresh message, `Ok(None)` when more fragments are needed.
    pub fn open(&mut self, head: Header, body: &[u8], now: Instant) -> Result<Option<Vec<u8>>, SleeveError> {
        self.retire(now);
        let phase = usize::from(head.phase & 1);
        let key = self.keys[phase].as_ref().ok_or(SleeveError::KeyPhase)?;
        if head.kind != key.cipher.kind() {
            return Err(SleeveError::ModeMismatch);
        }
        if body.len() > MAX_DATAGRAM - HEADER_LEN {
            return Err(SleeveError::FragmentSize);
        }
        key.window.check(head.counter)?;
        let mut msg = if head.frag_count == 1 {
            body.to_vec()
        } else {
            match self.reassemble(head, body, now)? {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        let key = self.keys[phase].as_mut().ok_or(SleeveError::KeyPhase)?;
        if let Cipher::Aes256Gcm(k) = &key.cipher {
            let aad = head.aad();
            let n = k.open_in_place(nonce(head.counter), Aad::from(aad), &mut msg).map_err(|_| SleeveError::Auth)?.len();
            msg.truncate(n);
        }
        key.window.commit(head.counter)?;
        if !key.used {
            key.used = true;
            // The sender switched to the newest key: the other one has KEY_OVERLAP to go.
            if phase == self.newest {
                if let Some(old) = self.keys[1 - phase].as_mut() {
                    old.retire_at.get_or_insert(now + KEY_OVERLAP);
                }
            }
        }
        Ok(Some(msg))
    }

    /// Partly received messages dropped (expired or evicted) since the last call.
    pub fn take_discards(&mut self) -> Discards {
        std::mem::take(&mut self.discards)
    }

    /// Partly received messages held now.
    pub fn partials(&self) -> usize {
        self.partials.len()
    }

    /// Adds a fragment of a message of several; returns the message's bytes once complete.
    fn reassemble(&mut self, head: Header, body: &[u8], now: Instant) -> Result<Option<Vec<u8>>, SleeveError> {
        if body.is_empty() {
            return Err(SleeveError::FragmentSize);
        }
        let before = self.partials.len();
        self.partials.retain(|p| now.saturating_duration_since(p.started) < PARTIAL_TIMEOUT);
        self.discards.expired += (before - self.partials.len()) as u64;
        let at = match self.partials.iter().position(|p| p.counter == head.counter && p.phase == head.phase) {
            Some(i) => {
                if self.partials[i].count != head.frag_count {
                    return Err(SleeveError::FragmentCount);
                }
                i
            }
            None => {
                let p = Partial {
                    phase: head.phase,
                    counter: head.counter,
                    count: head.frag_count,
                    got: 0,
                    started: now,
                    chunk: None,
                    last: None,
                    body: Vec::new(),
                    tail: Vec::new(),
                    have: [0; 4],
                };
                // Checked before it takes a place, so a refused fragment evicts nothing.
                p.fits(head.frag_index, body.len())?;
                if self.partials.len() >= MAX_PARTIALS {
                    let oldest = (0..self.partials.len()).min_by_key(|&i| self.partials[i].started);
                    if let Some(i) = oldest {
                        self.partials.swap_remove(i);
                        self.discards.evicted += 1;
                    }
                }
                self.partials.push(p);
                self.partials.len() - 1
            }
        };
        let p = &mut self.partials[at];
        let slot = usize::from(head.frag_index);
        let bit = 1u64 << (slot % 64);
        if p.have[slot / 64] & bit != 0 {
            // A duplicate: the first copy stays (the tag decides whether it was the real one).
            return Ok(None);
        }
        let (chunk, last) = p.fits(head.frag_index, body.len())?;
        p.chunk = chunk;
        p.last = last;
        p.have[slot / 64] |= bit;
        if slot + 1 == usize::from(p.count) {
            p.tail.extend_from_slice(body);
        } else {
            // `fits` made every fragment but the last `chunk` long.
            let at = slot * body.len();
            if p.body.capacity() == 0 {
                // Room for the whole message at once: no growing (each growth is a copy).
                p.body.reserve_exact(usize::from(p.count) * body.len());
            }
            if p.body.len() == at {
                p.body.extend_from_slice(body);
            } else {
                if p.body.len() < at + body.len() {
                    p.body.resize(at + body.len(), 0);
                }
                p.body[at..at + body.len()].copy_from_slice(body);
            }
        }
        p.got += 1;
        if p.got < usize::from(p.count) {
            return Ok(None);
        }
        let mut done = self.partials.swap_remove(at);
        done.body.extend_from_slice(&done.tail);
        Ok(Some(done.body))
    }
}

/// A frame record's fixed fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// The peer whose TAP the frame came from.
    pub src: PeerName,
    /// The destination peer (ignored for broadcasts).
    pub dst: PeerName,
    /// [`FLAG_BROADCAST`] and future flags.
    pub flags: u8,
    /// Hops left.
    pub ttl: u8,
    /// The virtio-net header that came with the frame (GSO and checksum offload metadata).
    pub vnet: [u8; VNET_LEN],
    /// The network (L2 segment) the frame belongs to; 0 is the default network.
    pub segment: u32,
}

impl FrameMeta {
    /// Whether this frame is for every peer.
    pub fn is_broadcast(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }
}

/// One record of an opened message.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// An Ethernet frame.
    Frame(FrameMeta, &'a [u8]),
    /// A sleeve heartbeat (proves the UDP path works in this direction).
    Heartbeat,
    /// A path MTU probe of `size` bytes (the datagram it came in), to acknowledge.
    Probe {
        /// The prober's id for it.
        id: u32,
        /// The datagram size it tests.
        size: u16,
    },
    /// A round-trip echo request: answer with a [`Record::Pong`] of the same stamp.
    Ping(u64),
    /// The answer to our [`Record::Ping`]: its stamp, and how long the peer held it (microseconds)
    /// before the message that answers it left.
    Pong {
        /// The request's stamp.
        stamp: u64,
        /// Time between the request's arrival and the answer's sending.
        held_us: u32,
    },
    /// The peer received our probe `id` of `size` bytes.
    ProbeAck {
        /// The probe's id.
        id: u32,
        /// Its size.
        size: u16,
    },
}

/// Appends records to a message body.
#[derive(Default)]
pub struct MessageBuilder;

impl MessageBuilder {
    /// Appends a frame record.
    pub fn push_frame(msg: &mut Vec<u8>, meta: &FrameMeta, frame: &[u8]) {
        msg.push(if meta.segment == 0 { REC_FRAME } else { REC_SEGMENT_FRAME });
        msg.extend_from_slice(&meta.src.to_bytes());
        msg.extend_from_slice(&meta.dst.to_bytes());
        msg.push(meta.flags);
        msg.push(meta.ttl);
        msg.extend_from_slice(&meta.vnet);
        msg.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        if meta.segment != 0 {
            msg.extend_from_slice(&meta.segment.to_be_bytes());
        }
        msg.extend_from_slice(frame);
    }

    /// Appends a heartbeat record.
    pub fn push_heartbeat(msg: &mut Vec<u8>) {
        msg.push(REC_HEARTBEAT);
    }

    /// Makes `msg` a probe of `size` bytes: a message that [`Sealer::seal`] turns into exactly
    /// one datagram of `size` bytes, sealed `encrypted` or not (the record, padded).
    pub fn probe(msg: &mut Vec<u8>, encrypted: bool, id: u32, size: u16) {
        let body = usize::from(size).saturating_sub(HEADER_LEN + if encrypted { TAG_LEN } else { 0 });
        msg.clear();
        msg.push(REC_PROBE);
        msg.extend_from_slice(&size.to_be_bytes());
        msg.extend_from_slice(&id.to_be_bytes());
        msg.resize(body.max(PROBE_RECORD_LEN), 0);
    }

    /// Appends a round-trip echo request stamped with the sender's clock (microseconds).
    pub fn push_ping(msg: &mut Vec<u8>, stamp: u64) {
        msg.push(REC_PING);
        msg.extend_from_slice(&stamp.to_be_bytes());
    }

    /// Appends the answer to an echo request of `stamp`, held `held_us` microseconds.
    pub fn push_pong(msg: &mut Vec<u8>, stamp: u64, held_us: u32) {
        msg.push(REC_PONG);
        msg.extend_from_slice(&stamp.to_be_bytes());
        msg.extend_from_slice(&held_us.to_be_bytes());
    }

    /// Appends the acknowledgement of probe `id` of `size` bytes.
    pub fn push_probe_ack(msg: &mut Vec<u8>, id: u32, size: u16) {
        msg.push(REC_PROBE_ACK);
        msg.extend_from_slice(&size.to_be_bytes());
        msg.extend_from_slice(&id.to_be_bytes());
    }

    /// Bytes the record of a frame of `frame_len` with `meta` takes.
    pub fn frame_cost(meta: &FrameMeta, frame_len: usize) -> usize {
        1 + FRAME_RECORD_LEN + if meta.segment == 0 { 0 } else { 4 } + frame_len
    }
}

/// Iterates over the records of an opened message; yields an error and stops
/// at the first record that does not parse.
pub fn records(msg: &[u8]) -> impl Iterator<Item = Result<Record<'_>, SleeveError>> {
    let mut rest = msg;
    std::iter::from_fn(move || {
        let (&ty, after) = rest.split_first()?;
        match ty {
            REC_HEARTBEAT => {
                rest = after;
                Some(Ok(Record::Heartbeat))
            }
            REC_PING if after.len() >= 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&after[..8]);
                rest = &after[8..];
                Some(Ok(Record::Ping(u64::from_be_bytes(b))))
            }
            REC_PONG if after.len() >= 12 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&after[..8]);
                let held_us = u32::from_be_bytes([after[8], after[9], after[10], after[11]]);
                rest = &after[12..];
                Some(Ok(Record::Pong { stamp: u64::from_be_bytes(b), held_us }))
            }
            REC_PROBE | REC_PROBE_ACK if after.len() >= PROBE_RECORD_LEN - 1 => {
                let size = u16::from_be_bytes([after[0], after[1]]);
                let id = u32::from_be_bytes([after[2], after[3], after[4], after[5]]);
                if ty == REC_PROBE {
                    // The padding is the rest of the message.
                    rest = &[];
                    Some(Ok(Record::Probe { id, size }))
                } else {
                    rest = &after[PROBE_RECORD_LEN - 1..];
                    Some(Ok(Record::ProbeAck { id, size }))
                }
            }
            REC_FRAME | REC_SEGMENT_FRAME if after.len() >= FRAME_RECORD_LEN + if ty == REC_SEGMENT_FRAME { 4 } else { 0 } => {
                let f = &after[..FRAME_RECORD_LEN];
                let mut src = [0u8; 6];
                src.copy_from_slice(&f[0..6]);
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&f[6..12]);
                let mut vnet = [0u8; VNET_LEN];
                vnet.copy_from_slice(&f[14..14 + VNET_LEN]);
                let l = 14 + VNET_LEN;
                let len = u32::from_be_bytes([f[l], f[l + 1], f[l + 2], f[l + 3]]) as usize;
                let (segment, body) = if ty == REC_SEGMENT_FRAME {
                    let s = &after[FRAME_RECORD_LEN..FRAME_RECORD_LEN + 4];
                    (u32::from_be_bytes([s[0], s[1], s[2], s[3]]), &after[FRAME_RECORD_LEN + 4..])
                } else {
                    (0, &after[FRAME_RECORD_LEN..])
                };
                if body.len() < len {
                    rest = &[];
                    return Some(Err(SleeveError::BadRecord));
                }
                rest = &body[len..];
                let meta = FrameMeta {
                    src: PeerName::from_bytes(src),
                    dst: PeerName::from_bytes(dst),
                    flags: f[12],
                    ttl: f[13],
                    vnet,
                    segment,
                };
                Some(Ok(Record::Frame(meta, &body[..len])))
            }
            _ => {
                rest = &[];
                Some(Err(SleeveError::BadRecord))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair(encrypted: bool) -> (Sealer, Opener) {
        let c = || if encrypted { Cipher::aes256gcm(&[7u8; 32]) } else { Cipher::Plain };
        (Sealer::new(c(), 0x0102_0304), Opener::new(c()))
    }

    fn meta() -> FrameMeta {
        FrameMeta {
            src: PeerName::from_u64(1),
            dst: PeerName::from_u64(2),
            flags: 0,
            ttl: INITIAL_TTL,
            vnet: [0; VNET_LEN],
            segment: 0,
        }
    }

    /// One fixed instant, so tests on time read as offsets from it.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// A sealed message of one 60 000-byte frame: (its records, its fragments).
    fn big_message(s: &mut Sealer) -> (Vec<u8>, Vec<Vec<u8>>) {
        let frame: Vec<u8> = (0..60_000u32).map(|i| (i * 7) as u8).collect();
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), &frame);
        let records = msg.clone();
        let mut wire = Vec::new();
        let seg = s.seal(&mut msg, 1472, &mut wire);
        (records, wire.chunks(seg).map(<[u8]>::to_vec).collect())
    }

    /// A spoofed fragment: any counter, `count` fragments, a body of `len` bytes of junk.
    fn spoof(receiver: u32, counter: u64, index: u8, count: u8, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; HEADER_LEN + len];
        Header { kind: KIND_AES256GCM, phase: 0, frag_index: index, frag_count: count, receiver, counter }.emit(&mut d);
        d[HEADER_LEN..].fill(0x5a);
        d
    }

    fn feed(o: &mut Opener, d: &[u8], now: Instant) -> Result<Option<Vec<u8>>, SleeveError> {
        let (h, b) = Header::parse(d)?;
        o.open(h, b, now)
    }

    /// Feeds every fragment of `wire` (fragments of `seg` bytes) to the opener.
    fn deliver(o: &mut Opener, wire: &[u8], seg: usize) -> Result<Option<Vec<u8>>, SleeveError> {
        let mut last = Ok(None);
        for d in wire.chunks(seg) {
            let (h, b) = Header::parse(d)?;
            last = o.open(h, b, t0());
            last.clone()?;
        }
        last
    }

    #[test]
    fn header_literal_bytes() {
        let h = Header { kind: KIND_AES256GCM, phase: 0, frag_index: 2, frag_count: 3, receiver: 0xa0b0c0d0, counter: 0x1122 };
        let mut b = [0u8; HEADER_LEN];
        h.emit(&mut b);
        assert_eq!(b, [1, 1, 2, 3, 0xa0, 0xb0, 0xc0, 0xd0, 0, 0, 0, 0, 0, 0, 0x11, 0x22]);
        assert_eq!(Header::parse(&b), Ok((h, &[][..])));
        assert_eq!(Header::parse(&b[..15]), Err(SleeveError::Malformed));
        let mut bad = b;
        bad[2] = 3; // index == count
        assert_eq!(Header::parse(&bad), Err(SleeveError::Malformed));
        bad = b;
        bad[0] = 9;
        assert_eq!(Header::parse(&bad), Err(SleeveError::UnknownKind));
    }

    #[test]
    fn large_message_fragments_and_reassembles_out_of_order() {
        let (mut s, mut o) = pair(true);
        let frame: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), &frame);
        let mut wire = Vec::new();
        let seg = s.seal(&mut msg, 1472, &mut wire);
        assert_eq!(seg, 1472);
        let mut frags: Vec<&[u8]> = wire.chunks(seg).collect();
        assert!(frags.len() > 40);
        frags.reverse();
        let mut out = None;
        for f in frags {
            let (h, b) = Header::parse(f).expect("parse");
            if let Some(m) = o.open(h, b, t0()).expect("open") {
                out = Some(m);
            }
        }
        let out = out.expect("complete");
        let recs: Vec<_> = records(&out).collect();
        assert_eq!(recs, vec![Ok(Record::Frame(meta(), &frame[..]))]);
        // Fragments are written in place where they belong: odd ones first, the last in the
        // middle, every one twice (a copy changed in flight after its first copy is ignored).
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), &frame);
        let seg = s.seal(&mut msg, 1200, &mut wire);
        let frags: Vec<&[u8]> = wire.chunks(seg).collect();
        let n = frags.len();
        let order = (0..n).filter(|i| i % 2 == 1).chain([n - 1]).chain((0..n - 1).filter(|i| i % 2 == 0));
        let mut out = None;
        for i in order {
            let (h, b) = Header::parse(frags[i]).expect("parse");
            let mut bad = b.to_vec();
            bad[0] ^= 0xff;
            for body in [b, &bad[..]] {
                match o.open(h, body, t0()) {
                    Ok(Some(m)) => assert!(out.replace(m).is_none(), "completed twice"),
                    Ok(None) => {}
                    // The copy of the fragment that completed it: the message was taken.
                    Err(SleeveError::Replay) if out.is_some() => {}
                    Err(e) => panic!("fragment {i}: {e}"),
                }
            }
        }
        let out = out.expect("complete");
        assert_eq!(records(&out).collect::<Vec<_>>(), vec![Ok(Record::Frame(meta(), &frame[..]))]);
    }

    #[test]
    fn replayed_and_tampered_messages_are_dropped() {
        let (mut s, mut o) = pair(true);
        let mut msg = Vec::new();
        MessageBuilder::push_heartbeat(&mut msg);
        let mut wire = Vec::new();
        let seg = s.seal(&mut msg, 1472, &mut wire);
        let mut tampered = wire.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(deliver(&mut o, &tampered, seg), Err(SleeveError::Auth));
        assert!(deliver(&mut o, &wire, seg).expect("first").is_some());
        assert_eq!(deliver(&mut o, &wire, seg), Err(SleeveError::Replay));
    }

    #[test]
    fn wrong_key_and_wrong_mode_fail() {
        let (mut s, _) = pair(true);
        let mut o = Opener::new(Cipher::aes256gcm(&[8u8; 32]));
        let mut msg = vec![REC_HEARTBEAT];
        let mut wire = Vec::new();
        let seg = s.seal(&mut msg, 1472, &mut wire);
        assert_eq!(deliver(&mut o, &wire, seg), Err(SleeveError::Auth));
        let mut plain = Opener::new(Cipher::Plain);
        assert_eq!(deliver(&mut plain, &wire, seg), Err(SleeveError::ModeMismatch));
    }

    #[test]
    fn plaintext_session_round_trips() {
        let (mut s, mut o) = pair(false);
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), b"hello");
        MessageBuilder::push_heartbeat(&mut msg);
        let mut wire = Vec::new();
        let seg = s.seal(&mut msg, 1472, &mut wire);
        let out = deliver(&mut o, &wire, seg).expect("open").expect("complete");
        let recs: Vec<_> = records(&out).collect();
        assert_eq!(recs, vec![Ok(Record::Frame(meta(), &b"hello"[..])), Ok(Record::Heartbeat)]);
    }

    #[test]
    fn a_named_networks_frames_carry_their_segment_and_the_default_networks_do_not() {
        let red = FrameMeta { segment: 0x00ab_cdef, ..meta() };
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), b"default");
        let plain_len = msg.len();
        assert_eq!(plain_len, MessageBuilder::frame_cost(&meta(), 7));
        MessageBuilder::push_frame(&mut msg, &red, b"red");
        assert_eq!(msg.len() - plain_len, MessageBuilder::frame_cost(&red, 3));
        assert_eq!(msg[plain_len], 3, "the record type of a segment frame");
        let recs: Vec<_> = records(&msg).collect();
        assert_eq!(recs, vec![Ok(Record::Frame(meta(), &b"default"[..])), Ok(Record::Frame(red, &b"red"[..]))]);
        // Cut inside the segment field, or inside the frame after it: an error, never a frame.
        for cut in [plain_len + 1 + FRAME_RECORD_LEN + 2, msg.len() - 1] {
            let got: Vec<_> = records(&msg[..cut]).collect();
            assert_eq!(got.last(), Some(&Err(SleeveError::BadRecord)), "cut at {cut}");
            assert_eq!(got.len(), 2);
        }
    }

    #[test]
    fn truncated_records_are_errors() {
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), b"hello");
        msg.truncate(msg.len() - 1);
        assert_eq!(records(&msg).collect::<Vec<_>>(), vec![Err(SleeveError::BadRecord)]);
        assert_eq!(records(&[9]).collect::<Vec<_>>(), vec![Err(SleeveError::BadRecord)]);
    }

    #[test]
    fn spoofed_partials_do_not_stop_a_real_message() {
        let (mut s, mut o) = pair(true);
        let ms = Duration::from_millis(1);
        // The attack of the issue: a flood of bogus first fragments with counters above the
        // real ones (the old table dropped the lowest counter: the real message).
        for i in 0..1000u64 {
            let d = spoof(0x0102_0304, 1_000_000 + i * 7919, 0, 45, 1456);
            assert_eq!(feed(&mut o, &d, t0()), Ok(None));
        }
        assert_eq!(o.partials(), MAX_PARTIALS);
        // The real message arrives with the flood still going: a new bogus partial between
        // every three real fragments.
        let (records, frags) = big_message(&mut s);
        assert!(frags.len() > 40);
        let mut out = None;
        for (i, f) in frags.iter().enumerate() {
            let now = t0() + ms + Duration::from_micros(i as u64);
            if i % 3 == 0 {
                let d = spoof(0x0102_0304, 5_000_000 + i as u64, 1, 45, 1456);
                assert_eq!(feed(&mut o, &d, now), Ok(None));
            }
            if let Some(m) = feed(&mut o, f, now).expect("real fragment accepted") {
                out = Some(m);
            }
        }
        assert_eq!(out.as_deref(), Some(&records[..]), "the real message completes intact");
        assert!(o.take_discards().evicted >= 1000 - MAX_PARTIALS as u64);
        // And the next one too, once the flood's partials have expired.
        let (records, frags) = big_message(&mut s);
        let left = o.partials() as u64;
        assert!(left > 0);
        let later = t0() + PARTIAL_TIMEOUT + ms * 2;
        let got: Vec<_> = frags.iter().filter_map(|f| feed(&mut o, f, later).expect("accepted")).collect();
        assert_eq!(got, vec![records]);
        assert_eq!(o.take_discards(), Discards { expired: left, evicted: 0 });
        assert_eq!(o.partials(), 0);
    }

    #[test]
    fn a_full_table_drops_the_partial_that_started_first() {
        let (mut s, mut o) = pair(true);
        let ms = Duration::from_millis(1);
        // The real message starts first (counter 0), then MAX_PARTIALS bogus ones with lower
        // and higher counters start after it: the real one is the oldest and goes.
        let (_, frags) = big_message(&mut s);
        assert_eq!(feed(&mut o, &frags[0], t0()), Ok(None));
        for i in 0..MAX_PARTIALS as u64 {
            assert_eq!(feed(&mut o, &spoof(0x0102_0304, 100 + i, 0, 9, 1456), t0() + ms), Ok(None));
        }
        assert_eq!(o.take_discards(), Discards { expired: 0, evicted: 1 });
        // Its remaining fragments start it again without its first: it cannot complete.
        for f in &frags[1..] {
            assert_eq!(feed(&mut o, f, t0() + ms * 2), Ok(None));
        }
        // The next message, started after every bogus one, evicts them, not itself.
        let (records, frags) = big_message(&mut s);
        let got: Vec<_> = frags.iter().filter_map(|f| feed(&mut o, f, t0() + ms * 3).expect("accepted")).collect();
        assert_eq!(got, vec![records]);
    }

    #[test]
    fn partial_messages_expire() {
        let (mut s, mut o) = pair(true);
        let (records, frags) = big_message(&mut s);
        let (last, rest) = frags.split_last().expect("fragments");
        for f in rest {
            assert_eq!(feed(&mut o, f, t0()), Ok(None));
        }
        // Just inside the timeout the message still completes.
        let mut o2 = pair(true).1;
        for f in rest {
            assert_eq!(feed(&mut o2, f, t0()), Ok(None));
        }
        let just = t0() + PARTIAL_TIMEOUT - Duration::from_millis(1);
        assert_eq!(feed(&mut o2, last, just), Ok(Some(records)));
        // At the timeout the early fragments are gone: the last one starts a new partial alone.
        assert_eq!(feed(&mut o, last, t0() + PARTIAL_TIMEOUT), Ok(None));
        assert_eq!(o.take_discards(), Discards { expired: 1, evicted: 0 });
        assert_eq!(o.partials(), 1);
    }

    #[test]
    fn fragment_sizes_are_bounded() {
        let (_, mut o) = pair(true);
        let r = 0x0102_0304;
        // Longer than any datagram.
        let too_long = spoof(r, 1, 0, 1, MAX_DATAGRAM - HEADER_LEN + 1);
        assert_eq!(feed(&mut o, &too_long, t0()), Err(SleeveError::FragmentSize));
        // Empty fragment of a message of several.
        assert_eq!(feed(&mut o, &spoof(r, 2, 0, 3, 0), t0()), Err(SleeveError::FragmentSize));
        // More than a sealer ever produces: 255 fragments of 1456 bytes, and 3 of 64 000.
        assert_eq!(feed(&mut o, &spoof(r, 3, 0, 255, 1456), t0()), Err(SleeveError::FragmentSize));
        assert_eq!(feed(&mut o, &spoof(r, 4, 1, 4, 64_000), t0()), Err(SleeveError::FragmentSize));
        // The largest that fits: (count − 1) × chunk + 1 ≤ MAX_SEALED.
        let chunk = 1456;
        let count = (MAX_SEALED - 1) / chunk + 1;
        assert_eq!(feed(&mut o, &spoof(r, 5, 0, count as u8, chunk), t0()), Ok(None));
        assert_eq!(feed(&mut o, &spoof(r, 6, 0, count as u8 + 1, chunk), t0()), Err(SleeveError::FragmentSize));
        assert_eq!(o.partials(), 1, "refused fragments take no place");
        // Fragments of one message disagree: size of a middle one, last longer than the others,
        // count.
        assert_eq!(feed(&mut o, &spoof(r, 7, 0, 4, 1000), t0()), Ok(None));
        assert_eq!(feed(&mut o, &spoof(r, 7, 1, 4, 999), t0()), Err(SleeveError::FragmentSize));
        assert_eq!(feed(&mut o, &spoof(r, 7, 3, 4, 1001), t0()), Err(SleeveError::FragmentSize));
        assert_eq!(feed(&mut o, &spoof(r, 7, 2, 5, 1000), t0()), Err(SleeveError::FragmentCount));
        assert_eq!(feed(&mut o, &spoof(r, 7, 3, 4, 10), t0()), Ok(None));
        // A last fragment that came first bounds the others from below.
        assert_eq!(feed(&mut o, &spoof(r, 8, 2, 3, 500), t0()), Ok(None));
        assert_eq!(feed(&mut o, &spoof(r, 8, 0, 3, 499), t0()), Err(SleeveError::FragmentSize));
        // A complete message of bogus fragments fails the tag, and is gone.
        assert_eq!(feed(&mut o, &spoof(r, 8, 0, 3, 500), t0()), Ok(None));
        assert_eq!(feed(&mut o, &spoof(r, 8, 1, 3, 500), t0()), Err(SleeveError::Auth));
        assert_eq!(o.partials(), 2);
    }

    #[test]
    fn every_error_has_a_distinct_label() {
        let mut labels: Vec<&str> = SleeveError::ALL.iter().map(|e| e.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), SleeveError::ALL.len());
    }

    /// Seals a heartbeat message; returns its one datagram.
    fn heartbeat(s: &mut Sealer) -> Vec<u8> {
        let mut msg = Vec::new();
        MessageBuilder::push_heartbeat(&mut msg);
        let mut wire = Vec::new();
        s.seal(&mut msg, 1472, &mut wire);
        wire
    }

    #[test]
    fn a_probe_is_one_datagram_of_its_size_and_its_ack_comes_back() {
        for encrypted in [true, false] {
            let (mut s, mut o) = pair(encrypted);
            for size in [1200u16, 1372, 1472] {
                let mut msg = Vec::new();
                MessageBuilder::probe(&mut msg, s.encrypted(), 77, size);
                let mut wire = Vec::new();
                let seg = s.seal(&mut msg, usize::from(size), &mut wire);
                assert_eq!((seg, wire.len()), (usize::from(size), usize::from(size)), "encrypted {encrypted}");
                let (h, body) = Header::parse(&wire).expect("header");
                let opened = o.open(h, body, Instant::now()).expect("opens").expect("whole");
                let recs: Vec<_> = records(&opened).collect::<Result<_, _>>().expect("records");
                assert_eq!(recs, vec![Record::Probe { id: 77, size }]);
            }
        }
        let mut msg = Vec::new();
        MessageBuilder::push_probe_ack(&mut msg, 9, 1400);
        MessageBuilder::push_heartbeat(&mut msg);
        MessageBuilder::push_ping(&mut msg, 12345);
        MessageBuilder::push_pong(&mut msg, u64::MAX, 777);
        let recs: Vec<_> = records(&msg).collect::<Result<_, _>>().expect("records");
        assert_eq!(
            recs,
            vec![Record::ProbeAck { id: 9, size: 1400 }, Record::Heartbeat, Record::Ping(12345), Record::Pong { stamp: u64::MAX, held_us: 777 }]
        );
        // A pong cut short is refused.
        assert!(records(&msg[..msg.len() - 2]).any(|r| r.is_err()));
        // Cut short: refused, not read past the end.
        assert!(records(&msg[..4]).any(|r| r.is_err()));
    }

    #[test]
    fn key_phase_is_a_header_bit() {
        let h = Header { kind: KIND_AES256GCM, phase: 1, frag_index: 0, frag_count: 1, receiver: 9, counter: 3 };
        let mut b = [0u8; HEADER_LEN];
        h.emit(&mut b);
        assert_eq!(b[..4], [1, 0x81, 0, 1]);
        assert_eq!(Header::parse(&b), Ok((h, &[][..])));
        b[1] = 0x83;
        assert_eq!(Header::parse(&b), Err(SleeveError::UnknownKind));
        // A plaintext session has one key, phase 0.
        let (_, mut o) = pair(false);
        let mut d = [0u8; HEADER_LEN + 1];
        Header { kind: KIND_PLAIN, phase: 1, frag_index: 0, frag_count: 1, receiver: 9, counter: 0 }.emit(&mut d);
        assert_eq!(feed(&mut o, &d, t0()), Err(SleeveError::KeyPhase));
    }

    #[test]
    fn previous_key_opens_during_the_overlap_only() {
        let (mut s, mut o) = pair(true);
        let k1 = [11u8; 32];
        let ms = Duration::from_millis(1);
        assert!(feed(&mut o, &heartbeat(&mut s), t0()).expect("epoch 0").is_some());
        // Sealed under epoch 0 and still on its way when the sender switches.
        let late: Vec<Vec<u8>> = (0..3).map(|_| heartbeat(&mut s)).collect();
        // The receiver installs epoch 1 first; epoch 0 still opens.
        o.install(1, Cipher::aes256gcm(&k1));
        assert_eq!(o.epochs(), vec![1, 0]);
        assert!(feed(&mut o, &late[0], t0() + ms).expect("old key before the switch").is_some());
        // The sender switches: counters start again, the phase bit flips.
        s.rekey(1, Cipher::aes256gcm(&k1));
        assert_eq!((s.epoch(), s.sealed()), (1, 0));
        let first = heartbeat(&mut s);
        assert_eq!(Header::parse(&first).map(|(h, _)| (h.phase, h.counter)), Ok((1, 0)));
        let t1 = t0() + ms * 10;
        assert!(feed(&mut o, &first, t1).expect("new key").is_some());
        assert_eq!(o.opened(), 1);
        // Each key has its own replay window: counter 0 was used under both, and each refuses
        // its own repeat.
        assert_eq!(feed(&mut o, &first, t1), Err(SleeveError::Replay));
        assert_eq!(feed(&mut o, &late[0], t1), Err(SleeveError::Replay));
        // Within the overlap the old key opens what was in flight...
        assert!(feed(&mut o, &late[1], t1 + KEY_OVERLAP - ms).expect("old key in the overlap").is_some());
        // ...and after it, it is gone.
        assert_eq!(feed(&mut o, &late[2], t1 + KEY_OVERLAP), Err(SleeveError::KeyPhase));
        assert_eq!(o.epochs(), vec![1]);
        assert!(feed(&mut o, &heartbeat(&mut s), t1 + KEY_OVERLAP).expect("new key").is_some());
    }

    #[test]
    fn a_key_two_epochs_back_opens_nothing() {
        let (mut s, mut o) = pair(true);
        let old = heartbeat(&mut s);
        let (k1, k2) = ([11u8; 32], [12u8; 32]);
        o.install(1, Cipher::aes256gcm(&k1));
        s.rekey(1, Cipher::aes256gcm(&k1));
        assert!(feed(&mut o, &heartbeat(&mut s), t0()).expect("epoch 1").is_some());
        // Epoch 2 takes phase 0's slot even before epoch 0's overlap ended.
        o.install(2, Cipher::aes256gcm(&k2));
        assert_eq!(o.epochs(), vec![2, 1]);
        assert_eq!(feed(&mut o, &old, t0()), Err(SleeveError::Auth));
        s.rekey(2, Cipher::aes256gcm(&k2));
        assert!(feed(&mut o, &heartbeat(&mut s), t0()).expect("epoch 2").is_some());
        // A message of epoch 2's key with the phase bit flipped fails: the phase is authenticated.
        let mut flipped = heartbeat(&mut s);
        flipped[1] ^= KEY_PHASE_BIT;
        assert_eq!(feed(&mut o, &flipped, t0()), Err(SleeveError::Auth));
    }

    #[test]
    fn rekeying_drops_the_partials_of_the_replaced_key() {
        let (mut s, mut o) = pair(true);
        let (_, frags) = big_message(&mut s);
        assert_eq!(feed(&mut o, &frags[0], t0()), Ok(None));
        o.install(1, Cipher::aes256gcm(&[11u8; 32]));
        assert_eq!(o.partials(), 1, "epoch 0's partial stays while epoch 0 may still arrive");
        o.install(2, Cipher::aes256gcm(&[12u8; 32]));
        assert_eq!(o.partials(), 0);
    }

    proptest! {
        /// Any bytes given to the parser and opener give an error or a message, never a panic.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let (_, mut o) = pair(true);
            if let Ok((h, b)) = Header::parse(&data) {
                let _ = o.open(h, b, t0());
            }
            for r in records(&data) { let _ = r; }
        }

        /// Many frames of random sizes survive seal → fragment → open unchanged.
        #[test]
        fn batches_round_trip(sizes in proptest::collection::vec(0usize..3000, 1..20), dg in 200usize..1500) {
            let (mut s, mut o) = pair(true);
            let frames: Vec<Vec<u8>> = sizes.iter().map(|n| vec![0xab; *n]).collect();
            let mut msg = Vec::new();
            for f in &frames { MessageBuilder::push_frame(&mut msg, &meta(), f); }
            let mut wire = Vec::new();
            let seg = s.seal(&mut msg, dg, &mut wire);
            let out = deliver(&mut o, &wire, seg).expect("open").expect("complete");
            let got: Vec<Vec<u8>> = records(&out).map(|r| match r { Ok(Record::Frame(_, f)) => f.to_vec(), other => panic!("{other:?}") }).collect();
            prop_assert_eq!(got, frames);
        }
    }
}
