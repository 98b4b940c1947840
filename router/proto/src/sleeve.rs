//! Sleeve: the UDP data path's wire format, encryption and fragmentation.
//!
//! A *message* is a batch of records (Ethernet frames, heartbeats) sealed as
//! one AEAD unit under one counter, then cut into *fragments* that each fit a
//! UDP datagram. All fragments but the last have the same size, so a burst can
//! go out as one GSO send and come back as one GRO receive. See
//! `docs/protocol.md` for the byte layout.

use std::collections::BTreeMap;

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
/// Largest number of fragments of one message.
pub const MAX_FRAGMENTS: usize = 255;
/// Partially received messages kept per session; older ones are dropped.
pub const MAX_PARTIALS: usize = 16;
/// Bytes of a frame record's fixed part (after the type byte).
pub const FRAME_RECORD_LEN: usize = 6 + 6 + 1 + 1 + VNET_LEN + 4;
/// Bytes of the virtio-net header carried with each frame (offload metadata).
pub const VNET_LEN: usize = 10;
/// Record types.
const REC_FRAME: u8 = 1;
const REC_HEARTBEAT: u8 = 2;
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
    /// A record inside an authentic message did not parse.
    #[error("malformed record in sleeve message")]
    BadRecord,
}

impl SleeveError {
    /// Every variant, for counters indexed by reason.
    pub const ALL: [SleeveError; 8] = [
        SleeveError::Malformed,
        SleeveError::UnknownKind,
        SleeveError::UnknownSession,
        SleeveError::Replay,
        SleeveError::TooOld,
        SleeveError::Auth,
        SleeveError::ModeMismatch,
        SleeveError::BadRecord,
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
            SleeveError::BadRecord => "bad_record",
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
        if buf[0] != VERSION || (buf[1] != KIND_AES256GCM && buf[1] != KIND_PLAIN) {
            return Err(SleeveError::UnknownKind);
        }
        let h = Header {
            kind: buf[1],
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
        out[1] = self.kind;
        out[2] = self.frag_index;
        out[3] = self.frag_count;
        out[4..8].copy_from_slice(&self.receiver.to_be_bytes());
        out[8..16].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// The authenticated data: the header with the fragment fields zeroed,
    /// identical for every fragment of a message.
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
}

impl Sealer {
    /// `receiver` is the index the peer asked us to put in our datagrams.
    pub fn new(cipher: Cipher, receiver: u32) -> Self {
        Sealer { cipher, receiver, next_counter: 0 }
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
        let mut head =
            Header { kind: self.cipher.kind(), frag_index: 0, frag_count: 1, receiver: self.receiver, counter };
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

    /// The largest message body (records) that fits in [`MAX_FRAGMENTS`] fragments.
    pub fn max_message(max_datagram: usize) -> usize {
        (max_datagram.saturating_sub(HEADER_LEN).max(64)) * MAX_FRAGMENTS - TAG_LEN
    }
}

struct Partial {
    count: u8,
    got: usize,
    chunks: Vec<Vec<u8>>,
}

/// The receiving half of a session: reassembles, authenticates and de-duplicates.
pub struct Opener {
    cipher: Cipher,
    window: ReplayWindow,
    partials: BTreeMap<u64, Partial>,
}

impl Opener {
    /// A receiver with the given key.
    pub fn new(cipher: Cipher) -> Self {
        Opener { cipher, window: ReplayWindow::default(), partials: BTreeMap::new() }
    }

    /// Takes one fragment. Returns `Ok(Some(records))` when it completed an
    /// authentic, fresh message, `Ok(None)` when more fragments are needed.
    pub fn open(&mut self, head: Header, body: &[u8]) -> Result<Option<Vec<u8>>, SleeveError> {
        if head.kind != self.cipher.kind() {
            return Err(SleeveError::ModeMismatch);
        }
        self.window.check(head.counter)?;
        let mut msg = if head.frag_count == 1 {
            body.to_vec()
        } else {
            let p = self.partials.entry(head.counter).or_insert_with(|| Partial {
                count: head.frag_count,
                got: 0,
                chunks: vec![Vec::new(); head.frag_count as usize],
            });
            if p.count != head.frag_count {
                return Err(SleeveError::Malformed);
            }
            let slot = &mut p.chunks[head.frag_index as usize];
            if slot.is_empty() {
                slot.extend_from_slice(body);
                p.got += 1;
            }
            if p.got < p.count as usize {
                while self.partials.len() > MAX_PARTIALS {
                    self.partials.pop_first();
                }
                return Ok(None);
            }
            match self.partials.remove(&head.counter) {
                Some(p) => p.chunks.concat(),
                None => return Ok(None),
            }
        };
        if let Cipher::Aes256Gcm(key) = &self.cipher {
            let aad = head.aad();
            let n = key
                .open_in_place(nonce(head.counter), Aad::from(aad), &mut msg)
                .map_err(|_| SleeveError::Auth)?
                .len();
            msg.truncate(n);
        }
        self.window.commit(head.counter)?;
        Ok(Some(msg))
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
}

/// Appends records to a message body.
#[derive(Default)]
pub struct MessageBuilder;

impl MessageBuilder {
    /// Appends a frame record.
    pub fn push_frame(msg: &mut Vec<u8>, meta: &FrameMeta, frame: &[u8]) {
        msg.push(REC_FRAME);
        msg.extend_from_slice(&meta.src.to_bytes());
        msg.extend_from_slice(&meta.dst.to_bytes());
        msg.push(meta.flags);
        msg.push(meta.ttl);
        msg.extend_from_slice(&meta.vnet);
        msg.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        msg.extend_from_slice(frame);
    }

    /// Appends a heartbeat record.
    pub fn push_heartbeat(msg: &mut Vec<u8>) {
        msg.push(REC_HEARTBEAT);
    }

    /// Bytes a frame record of `frame_len` takes.
    pub fn frame_cost(frame_len: usize) -> usize {
        1 + FRAME_RECORD_LEN + frame_len
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
            REC_FRAME if after.len() >= FRAME_RECORD_LEN => {
                let f = &after[..FRAME_RECORD_LEN];
                let mut src = [0u8; 6];
                src.copy_from_slice(&f[0..6]);
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&f[6..12]);
                let mut vnet = [0u8; VNET_LEN];
                vnet.copy_from_slice(&f[14..14 + VNET_LEN]);
                let l = 14 + VNET_LEN;
                let len = u32::from_be_bytes([f[l], f[l + 1], f[l + 2], f[l + 3]]) as usize;
                let body = &after[FRAME_RECORD_LEN..];
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
        }
    }

    /// Feeds every fragment of `wire` (fragments of `seg` bytes) to the opener.
    fn deliver(o: &mut Opener, wire: &[u8], seg: usize) -> Result<Option<Vec<u8>>, SleeveError> {
        let mut last = Ok(None);
        for d in wire.chunks(seg) {
            let (h, b) = Header::parse(d)?;
            last = o.open(h, b);
            last.clone()?;
        }
        last
    }

    #[test]
    fn header_literal_bytes() {
        let h = Header { kind: KIND_AES256GCM, frag_index: 2, frag_count: 3, receiver: 0xa0b0c0d0, counter: 0x1122 };
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
            if let Some(m) = o.open(h, b).expect("open") {
                out = Some(m);
            }
        }
        let out = out.expect("complete");
        let recs: Vec<_> = records(&out).collect();
        assert_eq!(recs, vec![Ok(Record::Frame(meta(), &frame[..]))]);
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
    fn truncated_records_are_errors() {
        let mut msg = Vec::new();
        MessageBuilder::push_frame(&mut msg, &meta(), b"hello");
        msg.truncate(msg.len() - 1);
        assert_eq!(records(&msg).collect::<Vec<_>>(), vec![Err(SleeveError::BadRecord)]);
        assert_eq!(records(&[9]).collect::<Vec<_>>(), vec![Err(SleeveError::BadRecord)]);
    }

    proptest! {
        /// Any bytes given to the parser and opener give an error or a message, never a panic.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let (_, mut o) = pair(true);
            if let Ok((h, b)) = Header::parse(&data) {
                let _ = o.open(h, b);
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
