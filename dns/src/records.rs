//! The record store: which names map to which container addresses, as a CRDT
//! gossiped over the mesh's `dns` channel.
//!
//! # Model
//!
//! An entry says "container `id` on peer `origin` is called `name` and has
//! address `addr`". Entries are keyed by `(origin, id, name, addr)`; the
//! value is a version and, for a removed entry, a tombstone with the time the
//! origin removed it. Only the origin creates or changes its entries; every
//! other peer just merges what it hears.
//!
//! - **Versions** are per origin and only grow. The first version after a
//!   start is given by the caller: the start time in microseconds, so the
//!   entries a restarted origin writes outrank those of its previous life.
//! - **Merge** keeps, per key, the value with the higher version. Two values
//!   with the same version but different content (possible only when an origin
//!   reused versions, e.g. its clock went back across a restart) are ordered by
//!   `(tombstone before live, then later deletion time)`: the maximum wins, so
//!   every peer picks the same one and a removal is never lost to a tie. This
//!   is a join on a total order per key, hence commutative, associative and
//!   idempotent (the property tests check it).
//! - **Tombstones** are kept for a while so a removal outruns the adds it
//!   cancels, then dropped by [`Records::expire_tombstones`] once they are older
//!   than a TTL *as seen locally* (time of local receipt, not the origin's
//!   clock, so hosts with skewed clocks still keep them for the full TTL).
//! - **Re-assertion**: the origin is the authority on its own entries. When it
//!   hears an entry in its own name that is newer than what it holds (left over
//!   from a previous life, or resurrected after its tombstone expired), it
//!   answers with its own truth at a higher version: a tombstone if it has no
//!   such live entry, its live entry otherwise. So after a restart, names of
//!   containers that vanished while it was down disappear everywhere, and the
//!   entries it re-adds come back.
//! - **Gone origins**: when a peer leaves the topology the shell calls
//!   [`Records::drop_origin`] (or [`Records::sync_origins`]): its entries leave
//!   the zone at once. They are kept aside (*quarantined*, not answered, not
//!   gossiped) for a TTL, and copies still circulating from peers that have not
//!   noticed yet go there too instead of resurrecting the names. If the peer
//!   comes back within the TTL (a healed partition) its entries return at once.
//! - **Signatures**: every entry travels with its origin's Ed25519 signature
//!   ([`DOMAIN_DNS`], over the postcard encoding of `(origin, id, name, addr,
//!   version, deleted_ms)`); an origin signs its entries when it makes or
//!   changes them (add, removal, re-assertion). An entry from a peer that
//!   would change our state is verified against the key bound to its origin
//!   ([`Keys`]) *before* it is merged; one that would change nothing is not
//!   verified at all (re-gossip of known entries costs no signature check).
//!   A bad signature drops the entry (counted per sending neighbour, see
//!   [`Refusals`]) and it is never passed on; so is an entry whose origin has
//!   no bound key yet (counted as unverified: anti-entropy brings it again
//!   once the key is known). Entries in our own name are checked against our
//!   own key: one we did not sign never replaces ours nor makes us re-assert
//!   (a forger could otherwise burn our version space). The rest of a payload
//!   is merged as usual: one bad entry does not refuse its honest neighbours.
//!
//! # Calling convention
//!
//! Sans-IO: no sockets, no clock. Time comes in as milliseconds (`now_ms`,
//! wall clock, as the shell reads it) on the calls that need it.
//! - Local changes ([`Records::add`], [`Records::remove`],
//!   [`Records::remove_container`]) return the delta to gossip
//!   (`Router::broadcast(CHANNEL, delta)`).
//! - Gossip from neighbours arrives through [`GossipChannel::merge`] (the
//!   router calls it and spreads the returned delta). Afterwards drain
//!   [`Records::poll_output`]: re-assertions addressed to the sender, and deltas
//!   learned from unicasts, for the router to send.
//! - The zone the server answers from is a [`ZoneView`] ([`Records::view`]),
//!   updated in place whenever the set of live entries changes.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_proto::identity::{signed_bytes, Refused};
use weft_proto::{GossipChannel, Keys, PeerName, PublicKey, Signature, SigningKey};

/// Domain label of a DNS entry's signature.
pub const DOMAIN_DNS: &[u8] = b"weft dns v1";
/// What a DNS entry's signature is called in refusals.
const SIGNED_WHAT: &str = "DNS entry";
/// Most neighbours refusals are counted for one by one (the totals count all).
pub const MAX_SENDERS: usize = 4096;

/// Longest container ID accepted (as IPAM).
pub const MAX_ID_LEN: usize = 256;
/// Longest name accepted, in characters, dots included (RFC 1035's 255 octets
/// on the wire less the length octets).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label of a name.
pub const MAX_LABEL_LEN: usize = 63;
/// Entries held at most, live, tombstones and quarantined together. With the
/// longest IDs and names an encoded, signed entry is about 630 bytes, so the
/// full state stays under [`MAX_PAYLOAD`] and the control channel's 16 MiB
/// message limit (a test checks it).
pub const MAX_ENTRIES: usize = 24_576;
/// Largest gossip payload accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// How long tombstones and the entries of gone peers are kept by default: long
/// enough for a removal to reach every peer through anti-entropy many times over.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// Why a local request or a peer's payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name that is not a valid DNS name relative to the zone.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A container ID that is empty, too long or has control characters.
    #[error("invalid container ID {id:?}: it must be 1 to {MAX_ID_LEN} printable characters")]
    InvalidId {
        /// The ID as given (cut to 64 characters).
        id: String,
    },
    /// The store holds [`MAX_ENTRIES`] entries already.
    #[error("the DNS store is full ({MAX_ENTRIES} entries): remove names or wait for removed ones to expire")]
    Full,
    /// A payload from a peer that does not decode.
    #[error("malformed DNS gossip: {0}")]
    Malformed(String),
    /// A payload from a peer that decodes but breaks the rules.
    #[error("invalid DNS gossip: {0}")]
    Invalid(String),
}

/// Checks a name relative to the zone (`web`, `db.prod`) and returns it in
/// lower case: labels of 1 to 63 letters, digits and `-`, not starting or
/// ending with `-`, 253 characters at most in all.
pub fn validate_name(name: &str) -> Result<String, Error> {
    let bad = |reason: String| Error::InvalidName {
        name: name.chars().take(300).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("the name is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "{} characters, at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad(
                "it has an empty label (two dots in a row, or a dot at an end)".into(),
            ));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad(format!(
                "the label {label:?} has {} characters, at most {MAX_LABEL_LEN} are allowed",
                label.len()
            )));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(bad(format!(
                "{c:?} is not allowed: only letters a-z, digits and '-'"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad(format!("the label {label:?} starts or ends with '-'")));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// Turns what a person typed (`web`, `web.weft.local`, `web.weft.local.`) into
/// a validated name relative to `domain` (e.g. `weft.local`; trailing dot optional).
pub fn relative_name(input: &str, domain: &str) -> Result<String, Error> {
    let s = input.strip_suffix('.').unwrap_or(input);
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    let lower = s.to_ascii_lowercase();
    if lower == d {
        return Err(Error::InvalidName {
            name: input.into(),
            reason: format!("it is the zone {d} itself"),
        });
    }
    let rel = if !d.is_empty() && lower.ends_with(&format!(".{d}")) {
        &s[..s.len() - d.len() - 1]
    } else {
        s
    };
    validate_name(rel)
}

fn validate_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(Error::InvalidId {
            id: id.chars().take(64).collect(),
        });
    }
    Ok(())
}

/// The identity of an entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    origin: PeerName,
    id: String,
    name: String,
    addr: IpAddr,
}

/// The replicated part of an entry plus local bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Val {
    version: u64,
    /// `Some(origin's deletion time, ms)` for a tombstone.
    deleted_ms: Option<u64>,
    /// When this tombstone was first seen here (local clock, ms). `None` until
    /// the next [`Records::expire_tombstones`] stamps it: merges carry no time.
    seen_ms: Option<u64>,
    /// The origin's signature of the entry (see [`message`]).
    sig: Signature,
}

/// The bytes an entry's signature covers (under [`DOMAIN_DNS`]): the postcard
/// encoding of `(origin, id, name, addr, version, deleted_ms)`, which is also
/// the encoding of the [`Entry`] with those fields.
fn message(key: &Key, version: u64, deleted_ms: Option<u64>) -> Vec<u8> {
    signed_bytes(&(key.origin, &key.id, &key.name, key.addr, version, deleted_ms))
}

/// A value of our own, signed with `signing`.
fn sealed(signing: &SigningKey, key: &Key, version: u64, deleted_ms: Option<u64>, seen_ms: Option<u64>) -> Val {
    Val {
        version,
        deleted_ms,
        seen_ms,
        sig: signing.sign(DOMAIN_DNS, &message(key, version, deleted_ms)),
    }
}

impl Val {
    /// The total order merge takes the maximum of (see the module docs).
    fn rank(&self) -> (u64, bool, u64) {
        (
            self.version,
            self.deleted_ms.is_some(),
            self.deleted_ms.unwrap_or(0),
        )
    }

    fn live(&self) -> bool {
        self.deleted_ms.is_none()
    }
}

/// One entry as gossiped and as shown by `weft status dns`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The peer whose container it is.
    pub origin: PeerName,
    /// The container ID.
    pub id: String,
    /// The name, lower case, relative to the zone.
    pub name: String,
    /// The address.
    pub addr: IpAddr,
    /// The origin's version of this entry.
    pub version: u64,
    /// For a removed entry: when its origin removed it (ms since the Unix epoch).
    pub deleted_ms: Option<u64>,
}

impl Entry {
    /// Whether the name is in use (not a tombstone).
    pub fn is_live(&self) -> bool {
        self.deleted_ms.is_none()
    }

    /// Signs it with `key` (which must be its origin's to verify anywhere).
    pub fn sign(self, key: &SigningKey) -> SignedEntry {
        let sig = key.sign(DOMAIN_DNS, &signed_bytes(&self));
        SignedEntry { entry: self, sig }
    }

    fn split(self, sig: Signature) -> (Key, Val) {
        (
            Key {
                origin: self.origin,
                id: self.id,
                name: self.name,
                addr: self.addr,
            },
            Val {
                version: self.version,
                deleted_ms: self.deleted_ms,
                seen_ms: None,
                sig,
            },
        )
    }

    fn join(k: &Key, v: &Val) -> Entry {
        Entry {
            origin: k.origin,
            id: k.id.clone(),
            name: k.name.clone(),
            addr: k.addr,
            version: v.version,
            deleted_ms: v.deleted_ms,
        }
    }

    fn signed(k: &Key, v: &Val) -> SignedEntry {
        SignedEntry {
            entry: Entry::join(k, v),
            sig: v.sig,
        }
    }
}

/// An entry with its origin's signature, as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    /// The entry.
    pub entry: Entry,
    /// Its origin's signature under [`DOMAIN_DNS`] of the entry's postcard encoding.
    pub sig: Signature,
}

/// Entries from peers that were not merged because they could not be verified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Entries whose signature is not their origin's (forged, or altered on
    /// the way): `bad_signature`.
    pub forged: u64,
    /// Entries whose origin has no bound key yet: `unknown_key`. Not an
    /// attack; they are merged when they come again after the key is bound.
    pub unverified: u64,
    /// The same by neighbour that sent them (at most [`MAX_SENDERS`]).
    pub by_sender: BTreeMap<PeerName, SenderRefusals>,
}

/// What one neighbour sent that could not be verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderRefusals {
    /// Entries with a bad signature.
    pub forged: u64,
    /// Entries whose origin had no bound key yet.
    pub unverified: u64,
}

impl Refusals {
    /// Counts a refusal of an entry sent by `from`; returns that sender's
    /// count of this kind so far (0 past [`MAX_SENDERS`] senders).
    fn count(&mut self, from: PeerName, why: &Refused) -> u64 {
        let unknown = matches!(why, Refused::UnknownKey { .. });
        if unknown {
            self.unverified += 1;
        } else {
            self.forged += 1;
        }
        if self.by_sender.len() >= MAX_SENDERS && !self.by_sender.contains_key(&from) {
            return 0;
        }
        let s = self.by_sender.entry(from).or_default();
        let n = if unknown { &mut s.unverified } else { &mut s.forged };
        *n += 1;
        *n
    }
}

/// One of our own live names, for the shell to persist and re-add after a
/// restart (with [`Records::add`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Registration {
    /// Container ID.
    pub id: String,
    /// Name relative to the zone.
    pub name: String,
    /// Address.
    pub addr: IpAddr,
}

/// Sizes, for `weft status dns` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Live entries (all origins).
    pub live: usize,
    /// Of which ours.
    pub own: usize,
    /// Tombstones held.
    pub tombstones: usize,
    /// Entries of gone peers held aside.
    pub quarantined: usize,
    /// Distinct names that resolve.
    pub names: usize,
    /// Peers with live entries.
    pub origins: usize,
}

/// Something the shell must send after [`GossipChannel::merge`] or
/// [`GossipChannel::handle_unicast`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Gossip this to neighbours: `Router::broadcast(CHANNEL, payload)`.
    Broadcast(Vec<u8>),
    /// Send this to one peer: `Router::send_unicast(peer, CHANNEL, payload)`.
    Unicast(PeerName, Vec<u8>),
}

/// The wire format. An enum so later versions can add messages.
#[derive(Serialize, Deserialize)]
enum Msg {
    /// Unsigned entries, as routers before signed DNS gossip sent them:
    /// decoded only to be refused with a clear message.
    Unsigned(Vec<Entry>),
    /// Entries, each signed by its origin.
    Entries(Vec<SignedEntry>),
}

/// Encodes signed entries as a payload of the `dns` channel (what a delta or
/// a full state is; exposed for tests and tools that play a peer).
pub fn encode_entries(entries: Vec<SignedEntry>) -> Vec<u8> {
    postcard::to_stdvec(&Msg::Entries(entries)).unwrap_or_default()
}

/// What the server answers from: live names and reverse mappings.
#[derive(Debug, Default)]
pub struct Zone {
    names: HashMap<String, Arc<[IpAddr]>>,
    addrs: HashMap<IpAddr, Arc<[String]>>,
    /// Names that exist only as parents of dotted names (`prod` for
    /// `db.prod`): they exist (NOERROR without data), so no NXDOMAIN for them.
    parents: HashSet<String>,
}

impl Zone {
    /// The addresses of a lower-case relative name, deduplicated, in address order.
    pub fn lookup(&self, name: &str) -> Option<&Arc<[IpAddr]>> {
        self.names.get(name)
    }

    /// The names (relative, lower case) of an address.
    pub fn reverse(&self, addr: &IpAddr) -> Option<&Arc<[String]>> {
        self.addrs.get(addr)
    }

    /// Whether a lower-case relative name exists: it has addresses or names
    /// below it.
    pub fn exists(&self, name: &str) -> bool {
        self.names.contains_key(name) || self.parents.contains(name)
    }

    /// Distinct names with addresses.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name resolves.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A shared, read-only handle on the live zone, cheap to clone and to read
/// from any thread: [`Records`] updates it under a write lock on every change
/// of the live set; readers take the read lock for one lookup.
#[derive(Clone, Debug, Default)]
pub struct ZoneView {
    inner: Arc<RwLock<Zone>>,
}

impl ZoneView {
    /// An empty view (for servers fed by something other than [`Records`]).
    pub fn new() -> ZoneView {
        ZoneView::default()
    }

    /// The zone, read-locked. Hold it briefly: changes wait for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Zone> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses of a relative name (any case).
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let name = name.to_ascii_lowercase();
        self.read()
            .lookup(&name)
            .map(|a| a.to_vec())
            .unwrap_or_default()
    }

    /// The names of an address.
    pub fn reverse(&self, addr: IpAddr) -> Vec<String> {
        self.read()
            .reverse(&addr)
            .map(|a| a.to_vec())
            .unwrap_or_default()
    }
}

/// A set of an origin's entries held aside while it is gone from the topology.
#[derive(Debug)]
struct Gone {
    since_ms: u64,
    entries: BTreeMap<Key, Val>,
}

/// Changes to the live set during one operation, published to the view at its end.
#[derive(Default)]
struct Touched {
    names: BTreeSet<String>,
    addrs: BTreeSet<IpAddr>,
    parents: BTreeSet<String>,
}

/// One peer's record store. See the module docs.
pub struct Records {
    me: PeerName,
    /// Our identity key: signs our entries.
    signing: SigningKey,
    /// Entries from peers dropped unverified.
    refusals: Refusals,
    /// Our next version.
    next_version: u64,
    /// Entries of present origins, live and tombstones.
    entries: BTreeMap<Key, Val>,
    /// Entries of origins gone from the topology.
    gone: BTreeMap<PeerName, Gone>,
    /// Live index: name → address → how many live entries say so.
    by_name: BTreeMap<String, BTreeMap<IpAddr, u32>>,
    /// Live index: address → name → count.
    by_addr: BTreeMap<IpAddr, BTreeMap<String, u32>>,
    /// Parents of dotted live names → how many live names below.
    parents: BTreeMap<String, u32>,
    view: ZoneView,
    out: VecDeque<Output>,
    dirty: bool,
    /// The latest time given to us (for deletion times of re-assertions).
    clock_ms: u64,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records")
            .field("me", &self.me)
            .field("counts", &self.counts())
            .finish()
    }
}

impl Records {
    /// An empty store for peer `me`, whose first own version is
    /// `initial_version` (pass the start time in microseconds). `signing` is
    /// `me`'s identity key (the one bound to `me` mesh-wide): it signs our
    /// entries, and entries in our name are checked against it.
    pub fn new(me: PeerName, initial_version: u64, signing: SigningKey) -> Records {
        Records {
            me,
            signing,
            refusals: Refusals::default(),
            next_version: initial_version.max(1),
            entries: BTreeMap::new(),
            gone: BTreeMap::new(),
            by_name: BTreeMap::new(),
            by_addr: BTreeMap::new(),
            parents: BTreeMap::new(),
            view: ZoneView::default(),
            out: VecDeque::new(),
            dirty: false,
            clock_ms: 0,
        }
    }

    /// Our peer name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The key our entries are signed with.
    pub fn public_key(&self) -> PublicKey {
        self.signing.public()
    }

    /// Entries from peers dropped because they could not be verified.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// A handle on the live zone for the server.
    pub fn view(&self) -> ZoneView {
        self.view.clone()
    }

    fn held(&self) -> usize {
        self.entries.len() + self.gone.values().map(|g| g.entries.len()).sum::<usize>()
    }

    fn bump(&mut self, above: u64) -> u64 {
        let v = self.next_version.max(above.saturating_add(1));
        self.next_version = v.saturating_add(1);
        v
    }

    /// Registers `name` (relative to the zone, any case) for our container `id`
    /// at `addr`. Returns the delta to gossip, or `None` when the entry was
    /// live already. Several containers may share a name (answered in rotating
    /// order) and a container may have several names and addresses.
    pub fn add(&mut self, id: &str, name: &str, addr: IpAddr) -> Result<Option<Vec<u8>>, Error> {
        validate_id(id)?;
        let name = validate_name(name)?;
        let key = Key {
            origin: self.me,
            id: id.to_owned(),
            name,
            addr,
        };
        let old = self.entries.get(&key).copied();
        if old.is_some_and(|v| v.live()) {
            return Ok(None);
        }
        if old.is_none() && self.held() >= MAX_ENTRIES {
            return Err(Error::Full);
        }
        let version = self.bump(old.map_or(0, |v| v.version));
        let val = sealed(&self.signing, &key, version, None, None);
        let mut t = Touched::default();
        self.put(key.clone(), val, &mut t);
        self.publish(t);
        self.dirty = true;
        Ok(Some(encode_entries(vec![Entry::signed(&key, &val)])))
    }

    /// Removes our entries of container `id`: all of them, or those with this
    /// name and/or address. Returns the delta to gossip (tombstones), or `None`
    /// when nothing matched.
    pub fn remove(
        &mut self,
        now_ms: u64,
        id: &str,
        name: Option<&str>,
        addr: Option<IpAddr>,
    ) -> Option<Vec<u8>> {
        self.clock_ms = self.clock_ms.max(now_ms);
        let name = name.map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase());
        let keys: Vec<Key> = self
            .entries
            .range(
                Key {
                    origin: self.me,
                    id: id.to_owned(),
                    name: String::new(),
                    addr: IpAddr::from([0u8; 4]),
                }..,
            )
            .take_while(|(k, _)| k.origin == self.me && k.id == id)
            .filter(|(k, v)| {
                v.live()
                    && name.as_ref().is_none_or(|n| *n == k.name)
                    && addr.is_none_or(|a| a == k.addr)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return None;
        }
        let mut t = Touched::default();
        let mut delta = Vec::with_capacity(keys.len());
        for k in keys {
            let old = self.entries.get(&k).map_or(0, |v| v.version);
            let version = self.bump(old);
            let val = sealed(&self.signing, &k, version, Some(now_ms), Some(now_ms));
            delta.push(Entry::signed(&k, &val));
            self.put(k, val, &mut t);
        }
        self.publish(t);
        self.dirty = true;
        Some(encode_entries(delta))
    }

    /// Removes all our entries of container `id` (it is gone).
    pub fn remove_container(&mut self, now_ms: u64, id: &str) -> Option<Vec<u8>> {
        self.remove(now_ms, id, None, None)
    }

    /// Merges a payload (full state or delta) from neighbour `from`, checking
    /// each entry that would change our state against the key `keys` binds to
    /// its origin (see "Signatures" in the module docs). Returns the delta of
    /// what changed here, to pass on: only verified entries. On error nothing
    /// was applied. Re-assertions of our own entries are also queued as an
    /// [`Output::Unicast`] to `from`, which the router's spreading skips.
    pub fn merge_payload(
        &mut self,
        from: PeerName,
        payload: &[u8],
        keys: &Keys,
    ) -> Result<Option<Vec<u8>>, Error> {
        let entries = Self::decode(payload)?;
        // Where each key would go, to check the size bound before applying anything.
        let mut new_keys: BTreeSet<(PeerName, &str, &str, IpAddr)> = BTreeSet::new();
        for SignedEntry { entry: e, .. } in &entries {
            let key = Key {
                origin: e.origin,
                id: e.id.clone(),
                name: e.name.clone(),
                addr: e.addr,
            };
            let known = match self.gone.get(&e.origin) {
                Some(g) => g.entries.contains_key(&key),
                None => self.entries.contains_key(&key),
            };
            if !known {
                new_keys.insert((e.origin, &e.id, &e.name, e.addr));
            }
        }
        if self.held() + new_keys.len() > MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "{} new entries would exceed the limit of {MAX_ENTRIES} (holding {})",
                new_keys.len(),
                self.held()
            )));
        }
        let mut t = Touched::default();
        let mut delta = Vec::new();
        let mut reasserted = Vec::new();
        for SignedEntry { entry, sig } in entries {
            let (key, val) = entry.split(sig);
            if key.origin == self.me {
                if let Some(v) = self.reassert(from, &key, val, &mut t) {
                    let e = Entry::signed(&key, &v);
                    delta.push(e.clone());
                    reasserted.push(e);
                }
                continue;
            }
            if let Some(g) = self.gone.get(&key.origin) {
                // Held aside, not passed on: the origin is gone as far as we
                // know. Verified all the same: held entries return to the zone
                // unchecked when the origin comes back.
                if g.entries.get(&key).is_some_and(|old| old.rank() >= val.rank()) {
                    continue;
                }
                if self.verify(from, keys, &key, &val) {
                    if let Some(g) = self.gone.get_mut(&key.origin) {
                        g.entries.insert(key, val);
                    }
                }
                continue;
            }
            let better = self
                .entries
                .get(&key)
                .is_none_or(|old| val.rank() > old.rank());
            if better && self.verify(from, keys, &key, &val) {
                delta.push(Entry::signed(&key, &val));
                self.put(key, val, &mut t);
            }
        }
        self.publish(t);
        if !reasserted.is_empty() {
            tracing::debug!(peer = %from, n = reasserted.len(), "re-asserting our own DNS entries");
            self.out
                .push_back(Output::Unicast(from, encode_entries(reasserted)));
        }
        Ok((!delta.is_empty()).then(|| encode_entries(delta)))
    }

    /// Whether `val` is `key.origin`'s signed entry, by the key `keys` binds to
    /// the origin; a refusal is counted against `from`, the neighbour that sent it.
    fn verify(&mut self, from: PeerName, keys: &Keys, key: &Key, val: &Val) -> bool {
        let msg = message(key, val.version, val.deleted_ms);
        match keys.verify(key.origin, DOMAIN_DNS, &msg, &val.sig, SIGNED_WHAT) {
            Ok(()) => true,
            Err(why) => {
                self.refused(from, key, &why);
                false
            }
        }
    }

    /// Whether `val` is an entry we signed ourselves (entries in our own name
    /// are checked against our own key, bound or not).
    fn verify_own(&mut self, from: PeerName, key: &Key, val: &Val) -> bool {
        let msg = message(key, val.version, val.deleted_ms);
        if self.signing.public().verify(DOMAIN_DNS, &msg, &val.sig) {
            return true;
        }
        let why = Refused::BadSignature {
            name: self.me,
            what: SIGNED_WHAT,
        };
        self.refused(from, key, &why);
        false
    }

    fn refused(&mut self, from: PeerName, key: &Key, why: &Refused) {
        let n = self.refusals.count(from, why);
        if matches!(why, Refused::UnknownKey { .. }) {
            tracing::debug!(peer = %from, origin = %key.origin, name = %key.name,
                "DNS entry of an origin with no bound key yet not merged (it comes again by anti-entropy)");
        } else if n.is_power_of_two() {
            // The first, second, fourth... from each neighbour: a forger cannot flood the log.
            tracing::warn!(peer = %from, origin = %key.origin, name = %key.name, forged_from_peer = n,
                "forged DNS entry dropped: {why}");
        }
    }

    /// An entry in our own name arrived. See "Re-assertion" and "Signatures"
    /// in the module docs. Returns the value we now hold if it must be announced.
    fn reassert(&mut self, from: PeerName, key: &Key, val: Val, t: &mut Touched) -> Option<Val> {
        let ours = self.entries.get(key).copied();
        if ours.is_some_and(|o| o.rank() >= val.rank()) {
            return None;
        }
        // Newer than ours: only our own signature (from a previous life) may
        // make us act; a forgery neither replaces ours nor bumps our versions.
        if !self.verify_own(from, key, &val) {
            return None;
        }
        let ours_live = ours.is_some_and(|o| o.live());
        if !val.live() && !ours_live {
            // A removal of ours from before: true, keep it (it expires).
            self.put(key.clone(), val, t);
            return None;
        }
        let version = self.bump(val.version);
        let deleted_ms = (!ours_live).then_some(self.clock_ms);
        let new = sealed(&self.signing, key, version, deleted_ms, None);
        self.put(key.clone(), new, t);
        Some(new)
    }

    fn decode(payload: &[u8]) -> Result<Vec<SignedEntry>, Error> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Invalid(format!(
                "payload of {} bytes (max {MAX_PAYLOAD})",
                payload.len()
            )));
        }
        let (msg, rest): (Msg, &[u8]) =
            postcard::take_from_bytes(payload).map_err(|e| Error::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Malformed(format!(
                "{} bytes after the message",
                rest.len()
            )));
        }
        let entries = match msg {
            Msg::Entries(entries) => entries,
            Msg::Unsigned(_) => {
                return Err(Error::Invalid(
                    "unsigned DNS entries (from a weft router that does not sign its DNS gossip): upgrade it".into(),
                ))
            }
        };
        if entries.len() > MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "{} entries in one payload (max {MAX_ENTRIES})",
                entries.len()
            )));
        }
        for SignedEntry { entry: e, .. } in &entries {
            validate_id(&e.id)
                .map_err(|err| Error::Invalid(format!("entry of {}: {err}", e.origin)))?;
            match validate_name(&e.name) {
                Ok(n) if n == e.name => {}
                Ok(_) => {
                    return Err(Error::Invalid(format!(
                        "entry of {}: name {:?} is not lower case",
                        e.origin, e.name
                    )))
                }
                Err(err) => return Err(Error::Invalid(format!("entry of {}: {err}", e.origin))),
            }
        }
        Ok(entries)
    }

    /// Drops tombstones, and entries of gone peers, held for longer than `ttl`
    /// here. Call it periodically (every few seconds). Returns how many went.
    pub fn expire_tombstones(&mut self, now_ms: u64, ttl: Duration) -> usize {
        self.clock_ms = self.clock_ms.max(now_ms);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let before = self.held();
        self.entries.retain(|_, v| {
            if v.live() {
                return true;
            }
            let seen = *v.seen_ms.get_or_insert(now_ms);
            now_ms.saturating_sub(seen) < ttl_ms
        });
        self.gone
            .retain(|_, g| now_ms.saturating_sub(g.since_ms) < ttl_ms);
        before - self.held()
    }

    /// A peer left the topology: its entries leave the zone now and are held
    /// aside (see the module docs). Returns whether it had any. Our own name is
    /// ignored.
    pub fn drop_origin(&mut self, now_ms: u64, peer: PeerName) -> bool {
        self.clock_ms = self.clock_ms.max(now_ms);
        if peer == self.me || self.gone.contains_key(&peer) {
            return false;
        }
        let start = Key {
            origin: peer,
            id: String::new(),
            name: String::new(),
            addr: IpAddr::from([0u8; 4]),
        };
        let keys: Vec<Key> = self
            .entries
            .range(start..)
            .take_while(|(k, _)| k.origin == peer)
            .map(|(k, _)| k.clone())
            .collect();
        let mut g = Gone {
            since_ms: now_ms,
            entries: BTreeMap::new(),
        };
        let mut t = Touched::default();
        for k in keys {
            if let Some(v) = self.take(&k, &mut t) {
                g.entries.insert(k, v);
            }
        }
        let had = !g.entries.is_empty();
        self.gone.insert(peer, g);
        self.publish(t);
        if had {
            tracing::debug!(%peer, "DNS entries of a gone peer dropped");
        }
        had
    }

    /// Brings the store in line with the topology: origins for which `is_live`
    /// is false are dropped ([`Records::drop_origin`]); gone origins that are
    /// live again get their held entries back, and those entries are queued
    /// to the origin ([`Output::Unicast`]) for it to re-assert. Call it
    /// whenever the topology changes (and on a periodic tick, which is cheap),
    /// then drain [`Records::poll_output`].
    pub fn sync_origins(&mut self, now_ms: u64, is_live: impl Fn(PeerName) -> bool) {
        let origins: BTreeSet<PeerName> = self
            .entries
            .keys()
            .map(|k| k.origin)
            .filter(|o| *o != self.me)
            .collect();
        for o in origins {
            if !is_live(o) {
                self.drop_origin(now_ms, o);
            }
        }
        let back: Vec<PeerName> = self.gone.keys().copied().filter(|p| is_live(*p)).collect();
        let mut t = Touched::default();
        for p in back {
            let Some(g) = self.gone.remove(&p) else {
                continue;
            };
            let mut released = Vec::new();
            for (k, v) in g.entries {
                if self.entries.get(&k).is_none_or(|old| v.rank() > old.rank()) {
                    if v.live() {
                        released.push(Entry::signed(&k, &v));
                    }
                    self.put(k, v, &mut t);
                }
            }
            // The origin may have restarted meanwhile and lost some of these:
            // show them to it, so it tombstones what it no longer has. (Held
            // aside, they were not in the full state it got from us.)
            if !released.is_empty() {
                self.out.push_back(Output::Unicast(p, encode_entries(released)));
            }
        }
        self.publish(t);
    }

    /// Next thing to send. Drain after every merge and unicast.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The addresses of a relative name (any case, trailing dot allowed),
    /// deduplicated, in address order.
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.by_name
            .get(&n)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The names of an address, in name order.
    pub fn reverse(&self, addr: IpAddr) -> Vec<String> {
        self.by_addr
            .get(&addr)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every entry of present origins, tombstones included, in key order.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .iter()
            .map(|(k, v)| Entry::join(k, v))
            .collect()
    }

    /// Our live entries, for the shell to persist.
    pub fn own(&self) -> Vec<Registration> {
        let start = Key {
            origin: self.me,
            id: String::new(),
            name: String::new(),
            addr: IpAddr::from([0u8; 4]),
        };
        self.entries
            .range(start..)
            .take_while(|(k, _)| k.origin == self.me)
            .filter(|(_, v)| v.live())
            .map(|(k, _)| Registration {
                id: k.id.clone(),
                name: k.name.clone(),
                addr: k.addr,
            })
            .collect()
    }

    /// Whether our own live entries changed since the last call (persist [`Records::own`]).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether our own live entries changed and [`Records::take_dirty`] has
    /// not been called since: [`Records::own`] is not on disk yet. Does not
    /// clear it.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Sizes.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        let mut origins = BTreeSet::new();
        for (k, v) in &self.entries {
            if v.live() {
                c.live += 1;
                origins.insert(k.origin);
                if k.origin == self.me {
                    c.own += 1;
                }
            } else {
                c.tombstones += 1;
            }
        }
        c.quarantined = self.gone.values().map(|g| g.entries.len()).sum();
        c.names = self.by_name.len();
        c.origins = origins.len();
        c
    }

    /// Sets `key` to `val`, keeping the live indexes right.
    fn put(&mut self, key: Key, val: Val, t: &mut Touched) {
        let was_live = self.entries.get(&key).is_some_and(|v| v.live());
        if was_live && !val.live() {
            self.unindex(&key, t);
        } else if !was_live && val.live() {
            self.index(&key, t);
        }
        self.entries.insert(key, val);
    }

    fn take(&mut self, key: &Key, t: &mut Touched) -> Option<Val> {
        let v = self.entries.remove(key)?;
        if v.live() {
            self.unindex(key, t);
        }
        Some(v)
    }

    fn index(&mut self, key: &Key, t: &mut Touched) {
        let addrs = self.by_name.entry(key.name.clone()).or_default();
        if addrs.is_empty() {
            for p in parents(&key.name) {
                let c = self.parents.entry(p.to_owned()).or_default();
                *c += 1;
                if *c == 1 {
                    t.parents.insert(p.to_owned());
                }
            }
        }
        let c = addrs.entry(key.addr).or_default();
        *c += 1;
        if *c == 1 {
            t.names.insert(key.name.clone());
            t.addrs.insert(key.addr);
        }
        *self
            .by_addr
            .entry(key.addr)
            .or_default()
            .entry(key.name.clone())
            .or_default() += 1;
    }

    fn unindex(&mut self, key: &Key, t: &mut Touched) {
        if let Some(addrs) = self.by_name.get_mut(&key.name) {
            if let Some(c) = addrs.get_mut(&key.addr) {
                *c -= 1;
                if *c == 0 {
                    addrs.remove(&key.addr);
                    t.names.insert(key.name.clone());
                    t.addrs.insert(key.addr);
                }
            }
            if addrs.is_empty() {
                self.by_name.remove(&key.name);
                for p in parents(&key.name) {
                    if let Some(c) = self.parents.get_mut(p) {
                        *c -= 1;
                        if *c == 0 {
                            self.parents.remove(p);
                            t.parents.insert(p.to_owned());
                        }
                    }
                }
            }
        }
        if let Some(names) = self.by_addr.get_mut(&key.addr) {
            if let Some(c) = names.get_mut(&key.name) {
                *c -= 1;
                if *c == 0 {
                    names.remove(&key.name);
                }
            }
            if names.is_empty() {
                self.by_addr.remove(&key.addr);
            }
        }
    }

    /// Writes what changed in the live indexes to the shared view.
    fn publish(&mut self, t: Touched) {
        if t.names.is_empty() && t.addrs.is_empty() && t.parents.is_empty() {
            return;
        }
        let mut z = self.view.inner.write().unwrap_or_else(|e| e.into_inner());
        for n in t.names {
            match self.by_name.get(&n) {
                Some(m) if !m.is_empty() => {
                    z.names.insert(n, m.keys().copied().collect());
                }
                _ => {
                    z.names.remove(&n);
                }
            }
        }
        for a in t.addrs {
            match self.by_addr.get(&a) {
                Some(m) if !m.is_empty() => {
                    z.addrs.insert(a, m.keys().cloned().collect());
                }
                _ => {
                    z.addrs.remove(&a);
                }
            }
        }
        for p in t.parents {
            if self.parents.contains_key(&p) {
                z.parents.insert(p);
            } else {
                z.parents.remove(&p);
            }
        }
    }
}

/// `a.b.c` → `b.c`, `c`.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(move |(i, _)| &name[i + 1..])
}

impl GossipChannel for Records {
    /// Every entry of present origins, tombstones included (not the entries of
    /// gone peers held aside), with their signatures.
    fn encode_full(&self) -> Vec<u8> {
        encode_entries(
            self.entries
                .iter()
                .map(|(k, v)| Entry::signed(k, v))
                .collect(),
        )
    }

    fn merge(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<Option<Vec<u8>>, String> {
        self.merge_payload(from, payload, keys).map_err(|e| e.to_string())
    }

    /// Merged like gossip (each entry verified the same way); what it teaches
    /// us is queued as [`Output::Broadcast`].
    fn handle_unicast(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<(), String> {
        if let Some(delta) = self
            .merge_payload(from, payload, keys)
            .map_err(|e| e.to_string())?
        {
            self.out.push_back(Output::Broadcast(delta));
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    fn peer(n: u64) -> PeerName {
        PeerName::from_u64(n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The identity key of a test peer (a fixed seed per name).
    fn key_of(p: PeerName) -> SigningKey {
        let mut seed = [0x5a; 32];
        seed[..8].copy_from_slice(&p.as_u64().to_le_bytes());
        SigningKey::from_seed(&seed).unwrap()
    }

    /// A payload of `entries`, each signed by its origin's key.
    fn signed(entries: Vec<Entry>) -> Vec<u8> {
        encode_entries(
            entries
                .into_iter()
                .map(|e| {
                    let k = key_of(e.origin);
                    e.sign(&k)
                })
                .collect(),
        )
    }

    /// A store for `me` with its own key.
    fn rec(me: PeerName, initial_version: u64) -> Records {
        Records::new(me, initial_version, key_of(me))
    }

    /// Keys bound for peers 1 to 128 (each its `key_of`), as a router would hold them.
    fn keys() -> &'static Keys {
        static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| {
            let mut k = Keys::new(weft_proto::Trust::FirstUse);
            for n in 1..=128 {
                let p = peer(n);
                k.admit(&weft_proto::identity::Claim::self_signed(&key_of(p), p)).unwrap();
            }
            k
        })
    }

    /// The state as a comparable value: entries of present origins.
    fn state(r: &Records) -> Vec<Entry> {
        r.entries()
    }

    #[test]
    fn names_are_validated() {
        assert_eq!(validate_name("Web").unwrap(), "web");
        assert_eq!(validate_name("db.prod-1").unwrap(), "db.prod-1");
        assert_eq!(validate_name("1a").unwrap(), "1a");
        for bad in [
            "",
            "-web",
            "web-",
            "we_b",
            "a..b",
            ".a",
            "a.",
            "wéb",
            "a b",
            &"a".repeat(64),
            &["abc"; 64].join("."),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidName { .. }), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("invalid DNS name"), "{e}");
        }
        assert!(validate_name(&"a".repeat(63)).is_ok());
        let long = [&"a".repeat(63)[..]; 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(validate_name(&long).is_err());
        assert!(validate_name(&long[2..]).is_ok());
        assert!(validate_name("under_score")
            .unwrap_err()
            .to_string()
            .contains("'_' is not allowed"));
    }

    #[test]
    fn relative_names() {
        assert_eq!(relative_name("web", "weft.local").unwrap(), "web");
        assert_eq!(
            relative_name("Web.Weft.Local.", "weft.local.").unwrap(),
            "web"
        );
        assert_eq!(
            relative_name("db.prod.weft.local", "weft.local").unwrap(),
            "db.prod"
        );
        assert!(relative_name("weft.local", "weft.local").is_err());
        assert!(relative_name("bad_name.weft.local", "weft.local").is_err());
    }

    #[test]
    fn add_lookup_remove() {
        let mut r = rec(peer(1), 100);
        let view = r.view();
        assert!(r.add("c1", "Web", ip("10.32.0.1")).unwrap().is_some());
        assert!(
            r.add("c1", "web", ip("10.32.0.1")).unwrap().is_none(),
            "already live"
        );
        r.add("c2", "web", ip("10.32.0.2")).unwrap();
        r.add("c3", "web", ip("10.32.0.1")).unwrap(); // same address again: deduplicated
        r.add("c3", "web", ip("fd00::1")).unwrap();
        assert_eq!(
            r.lookup("WEB"),
            vec![ip("10.32.0.1"), ip("10.32.0.2"), ip("fd00::1")]
        );
        assert_eq!(view.lookup("web"), r.lookup("web"));
        assert_eq!(r.reverse(ip("10.32.0.1")), vec!["web".to_string()]);
        assert_eq!(view.reverse(ip("10.32.0.1")), vec!["web".to_string()]);

        assert!(r.remove(5, "c1", None, None).is_some());
        assert_eq!(
            r.lookup("web"),
            vec![ip("10.32.0.1"), ip("10.32.0.2"), ip("fd00::1")],
            "c3 still has .1"
        );
        assert!(r
            .remove(5, "c3", Some("WEB"), Some(ip("10.32.0.1")))
            .is_some());
        assert_eq!(view.lookup("web"), vec![ip("10.32.0.2"), ip("fd00::1")]);
        assert!(view.reverse(ip("10.32.0.1")).is_empty());
        assert!(r.remove(5, "nope", None, None).is_none());
        assert!(r.remove_container(6, "c2").is_some());
        assert!(r.remove_container(6, "c3").is_some());
        assert!(view.lookup("web").is_empty());
        assert!(!view.read().exists("web"));
        let c = r.counts();
        assert_eq!((c.live, c.tombstones, c.names), (0, 4, 0));
    }

    #[test]
    fn invalid_input_is_refused() {
        let mut r = rec(peer(1), 1);
        assert!(matches!(
            r.add("c", "bad name", ip("10.0.0.1")),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            r.add("", "web", ip("10.0.0.1")),
            Err(Error::InvalidId { .. })
        ));
        assert!(matches!(
            r.add(&"x".repeat(257), "web", ip("10.0.0.1")),
            Err(Error::InvalidId { .. })
        ));
        assert!(r.entries().is_empty());
    }

    #[test]
    fn dotted_names_make_parents_exist() {
        let mut r = rec(peer(1), 1);
        r.add("c", "db.prod.eu", ip("10.0.0.1")).unwrap();
        let v = r.view();
        assert!(v.read().exists("prod.eu"));
        assert!(v.read().exists("eu"));
        assert!(v.read().lookup("prod.eu").is_none());
        r.add("d", "x.eu", ip("10.0.0.2")).unwrap();
        r.remove_container(1, "c");
        assert!(!v.read().exists("prod.eu"));
        assert!(v.read().exists("eu"));
        r.remove_container(1, "d");
        assert!(!v.read().exists("eu"));
    }

    #[test]
    fn tombstone_beats_older_add_and_readd_works() {
        let mut a = rec(peer(1), 1);
        let mut b = rec(peer(2), 1);
        let add = a.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        let del = a.remove(10, "c", None, None).unwrap();
        // Out of order: the tombstone first, then the older add.
        b.merge_payload(peer(1), &del, keys()).unwrap();
        assert_eq!(
            b.merge_payload(peer(1), &add, keys()).unwrap(),
            None,
            "the older add changes nothing"
        );
        assert!(b.lookup("web").is_empty());
        // Re-add after remove: a new, higher version.
        let readd = a.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        assert!(b.merge_payload(peer(1), &readd, keys()).unwrap().is_some());
        assert_eq!(b.lookup("web"), vec![ip("10.0.0.1")]);
        // Replaying the old tombstone does not hide it again.
        assert_eq!(b.merge_payload(peer(1), &del, keys()).unwrap(), None);
        assert_eq!(b.lookup("web"), vec![ip("10.0.0.1")]);
    }

    #[test]
    fn equal_versions_tie_break_to_the_tombstone() {
        let k = Entry {
            origin: peer(1),
            id: "c".into(),
            name: "web".into(),
            addr: ip("10.0.0.1"),
            version: 7,
            deleted_ms: None,
        };
        let t = Entry {
            deleted_ms: Some(3),
            ..k.clone()
        };
        let t2 = Entry {
            deleted_ms: Some(4),
            ..k.clone()
        };
        let mut x = rec(peer(9), 1);
        let mut y = rec(peer(8), 1);
        x.merge_payload(peer(1), &signed(vec![k.clone(), t.clone(), t2.clone()]), keys())
            .unwrap();
        y.merge_payload(peer(1), &signed(vec![t2.clone(), k.clone(), t]), keys())
            .unwrap();
        assert_eq!(state(&x), state(&y));
        assert_eq!(state(&x), vec![t2]);
    }

    #[test]
    fn restart_reasserts_own_entries() {
        let me = peer(1);
        let mut old = rec(me, 1_000);
        old.add("gone", "web", ip("10.0.0.1")).unwrap();
        old.add("kept", "db", ip("10.0.0.2")).unwrap();
        let mut other = rec(peer(2), 1);
        other.merge_payload(me, &old.encode_full(), keys()).unwrap();
        assert_eq!(other.lookup("web"), vec![ip("10.0.0.1")]);

        // The origin restarts with a later start time, re-adds what still exists.
        let mut new = rec(me, 2_000);
        new.add("kept", "db", ip("10.0.0.2")).unwrap();
        let delta = new
            .merge_payload(peer(2), &other.encode_full(), keys())
            .unwrap()
            .unwrap();
        // It tombstones the vanished container's name, keeps the other live.
        assert!(new.lookup("web").is_empty());
        assert_eq!(new.lookup("db"), vec![ip("10.0.0.2")]);
        let Some(Output::Unicast(to, reply)) = new.poll_output() else {
            panic!("no reply")
        };
        assert_eq!(to, peer(2));
        assert_eq!(reply, delta);
        other.merge_payload(me, &reply, keys()).unwrap();
        assert!(
            other.lookup("web").is_empty(),
            "the vanished name is gone everywhere"
        );
        assert_eq!(other.lookup("db"), vec![ip("10.0.0.2")]);
        // The re-added entry's new version reaches it by gossip; then it converges.
        assert!(other
            .merge_payload(me, &new.encode_full(), keys())
            .unwrap()
            .is_some());
        assert_eq!(
            new.merge_payload(peer(2), &other.encode_full(), keys()).unwrap(),
            None
        );
        assert_eq!(other.merge_payload(me, &new.encode_full(), keys()).unwrap(), None);
        assert_eq!(state(&new), state(&other));
    }

    #[test]
    fn own_entry_with_a_newer_version_is_outranked() {
        // The clock went back across a restart: the old life's versions are higher.
        let me = peer(1);
        let mut old = rec(me, 5_000);
        old.add("c", "web", ip("10.0.0.1")).unwrap();
        old.remove(1, "c", None, None);
        let mut new = rec(me, 10);
        new.add("c", "web", ip("10.0.0.1")).unwrap();
        let delta = new
            .merge_payload(peer(2), &old.encode_full(), keys())
            .unwrap()
            .unwrap();
        assert_eq!(
            new.lookup("web"),
            vec![ip("10.0.0.1")],
            "our live entry stays"
        );
        let mut third = rec(peer(3), 1);
        third.merge_payload(peer(2), &old.encode_full(), keys()).unwrap();
        assert!(third.lookup("web").is_empty());
        third.merge_payload(me, &delta, keys()).unwrap();
        assert_eq!(third.lookup("web"), vec![ip("10.0.0.1")]);
        assert!(new.add("c", "x", ip("10.0.0.9")).is_ok());
        assert!(new
            .entries()
            .iter()
            .all(|e| e.version > 5_000 || e.name != "web"));
    }

    #[test]
    fn unicast_merge_queues_a_broadcast() {
        let mut a = rec(peer(1), 1);
        let mut b = rec(peer(2), 1);
        let d = a.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        b.handle_unicast(peer(1), &d, keys()).unwrap();
        assert!(matches!(b.poll_output(), Some(Output::Broadcast(_))));
        assert_eq!(b.poll_output(), None);
    }

    #[test]
    fn tombstones_expire_by_local_receipt_time() {
        let mut a = rec(peer(1), 1);
        let mut b = rec(peer(2), 1);
        a.add("c", "web", ip("10.0.0.1")).unwrap();
        let del = a.remove(1_000, "c", None, None).unwrap();
        let ttl = Duration::from_secs(60);
        // The origin's deletion time is far in the past for b's clock: b still
        // keeps the tombstone a full TTL from when it saw it.
        assert_eq!(b.expire_tombstones(500_000, ttl), 0);
        b.merge_payload(peer(1), &del, keys()).unwrap();
        assert_eq!(b.expire_tombstones(600_000, ttl), 0, "stamped now");
        assert_eq!(b.expire_tombstones(659_999, ttl), 0);
        assert_eq!(b.expire_tombstones(660_000, ttl), 1);
        assert!(b.entries().is_empty());
        // The origin's own tombstone counts from its removal.
        assert_eq!(a.expire_tombstones(60_999, ttl), 0);
        assert_eq!(a.expire_tombstones(61_000, ttl), 1);
        // Live entries never expire.
        a.add("d", "db", ip("10.0.0.2")).unwrap();
        assert_eq!(a.expire_tombstones(u64::MAX, ttl), 0);
        assert_eq!(a.lookup("db").len(), 1);
    }

    #[test]
    fn expired_tombstone_then_stale_live_copy_is_retombstoned_by_origin() {
        let me = peer(1);
        let mut a = rec(me, 1);
        let mut stale = rec(peer(3), 1);
        stale
            .merge_payload(me, &a.add("c", "web", ip("10.0.0.1")).unwrap().unwrap(), keys())
            .unwrap();
        a.remove(0, "c", None, None);
        a.expire_tombstones(1_000_000, Duration::from_secs(1));
        assert!(a.entries().is_empty());
        // A peer that missed the removal gossips the old live entry back.
        let d = a
            .merge_payload(peer(3), &stale.encode_full(), keys())
            .unwrap()
            .unwrap();
        stale.merge_payload(me, &d, keys()).unwrap();
        assert!(stale.lookup("web").is_empty());
    }

    #[test]
    fn gone_origins_are_dropped_held_and_restored() {
        let x = peer(5);
        let mut xr = rec(x, 1);
        let full = {
            xr.add("c", "web", ip("10.0.0.1")).unwrap();
            xr.encode_full()
        };
        let mut y = rec(peer(1), 1);
        let mut z = rec(peer(2), 1);
        y.merge_payload(x, &full, keys()).unwrap();
        z.merge_payload(x, &full, keys()).unwrap();
        assert_eq!(y.lookup("web").len(), 1);

        y.sync_origins(1_000, |p| p != x);
        assert!(y.lookup("web").is_empty());
        assert!(y.view().lookup("web").is_empty());
        assert_eq!(y.counts().quarantined, 1);
        assert!(
            y.entries().is_empty(),
            "held-aside entries are not gossiped"
        );
        // z has not noticed yet and gossips them back: they do not resurrect.
        assert_eq!(y.merge_payload(peer(2), &z.encode_full(), keys()).unwrap(), None);
        assert!(y.lookup("web").is_empty());
        // A change x made meanwhile (relayed) is held too.
        let d = xr.add("c2", "api", ip("10.0.0.3")).unwrap().unwrap();
        assert_eq!(y.merge_payload(peer(2), &d, keys()).unwrap(), None);
        assert_eq!(y.counts().quarantined, 2);
        // x comes back (partition healed): its names return at once.
        y.sync_origins(2_000, |_| true);
        assert_eq!(y.lookup("web"), vec![ip("10.0.0.1")]);
        // ...and are shown to x, in case it restarted and lost some.
        let Some(Output::Unicast(to, shown)) = y.poll_output() else {
            panic!("nothing for x")
        };
        assert_eq!(to, x);
        assert_eq!(
            xr.merge_payload(peer(1), &shown, keys()).unwrap(),
            None,
            "x has them all"
        );
        assert_eq!(y.lookup("api"), vec![ip("10.0.0.3")]);
        assert_eq!(y.counts().quarantined, 0);
        // Gone for longer than the TTL: forgotten.
        assert!(y.drop_origin(3_000, x));
        assert!(!y.drop_origin(3_000, x), "already gone");
        assert!(!y.drop_origin(3_000, peer(1)), "never ourselves");
        assert_eq!(
            y.expire_tombstones(3_000 + 599_999, DEFAULT_TOMBSTONE_TTL),
            0
        );
        assert_eq!(
            y.expire_tombstones(3_000 + 600_000, DEFAULT_TOMBSTONE_TTL),
            2
        );
        assert_eq!(y.counts(), Counts::default());
        // And what arrives after that is accepted again (a fresh start of x).
        y.merge_payload(x, &xr.encode_full(), keys()).unwrap();
        assert_eq!(y.lookup("api").len(), 1);
    }

    #[test]
    fn own_registrations_and_dirty() {
        let mut r = rec(peer(1), 1);
        assert!(!r.is_dirty());
        assert!(!r.take_dirty());
        r.add("c", "web", ip("10.0.0.1")).unwrap();
        assert!(r.is_dirty());
        assert!(r.is_dirty(), "peeking does not clear it");
        assert!(r.take_dirty());
        assert!(!r.is_dirty());
        assert!(!r.take_dirty());
        let mut other = rec(peer(2), 1);
        other.add("o", "x", ip("10.0.0.9")).unwrap();
        r.merge_payload(peer(2), &other.encode_full(), keys()).unwrap();
        assert!(!r.take_dirty(), "others' entries are not ours to persist");
        assert_eq!(
            r.own(),
            vec![Registration {
                id: "c".into(),
                name: "web".into(),
                addr: ip("10.0.0.1")
            }]
        );
        r.remove_container(1, "c");
        assert!(r.take_dirty());
        assert!(r.own().is_empty());
    }

    /// The router sends no empty full state; an empty store is not empty on
    /// the wire (an empty list), and merges as nothing.
    #[test]
    fn an_empty_store_encodes_to_an_empty_list() {
        let empty = rec(peer(1), 1);
        assert_eq!(empty.encode_full(), [1, 0]);
        let mut r = rec(peer(2), 1);
        r.add("c", "web", ip("10.0.0.1")).unwrap();
        r.take_dirty();
        let before = state(&r);
        assert_eq!(r.merge_payload(peer(1), &empty.encode_full(), keys()).unwrap(), None);
        assert_eq!(state(&r), before);
        assert!(!r.is_dirty());
        assert!(r.poll_output().is_none());
    }

    #[test]
    fn malformed_and_invalid_payloads_are_refused_whole() {
        let mut r = rec(peer(1), 1);
        let good = Entry {
            origin: peer(2),
            id: "c".into(),
            name: "web".into(),
            addr: ip("10.0.0.1"),
            version: 1,
            deleted_ms: None,
        };
        for (payload, what) in [
            (vec![], "empty"),
            (vec![7, 1, 2, 3], "unknown message"),
            (vec![0, 0xff, 0xff, 0xff, 0xff, 0x0f], "huge count"),
            (
                {
                    let mut p = signed(vec![good.clone()]);
                    p.push(0);
                    p
                },
                "trailing bytes",
            ),
            (
                {
                    let p = signed(vec![good.clone()]);
                    p[..p.len() - 3].to_vec()
                },
                "truncated",
            ),
            (
                signed(vec![
                    good.clone(),
                    Entry {
                        name: "Web".into(),
                        ..good.clone()
                    },
                ]),
                "upper case",
            ),
            (
                signed(vec![
                    good.clone(),
                    Entry {
                        name: "a..b".into(),
                        ..good.clone()
                    },
                ]),
                "bad name",
            ),
            (
                signed(vec![
                    good.clone(),
                    Entry {
                        id: String::new(),
                        ..good.clone()
                    },
                ]),
                "empty id",
            ),
            (
                signed(vec![
                    good.clone(),
                    Entry {
                        id: "x".repeat(300),
                        ..good.clone()
                    },
                ]),
                "long id",
            ),
            (vec![0u8; MAX_PAYLOAD + 1], "oversized"),
            (
                postcard::to_stdvec(&Msg::Unsigned(vec![good.clone()])).unwrap(),
                "unsigned (an older router)",
            ),
        ] {
            assert!(r.merge_payload(peer(2), &payload, keys()).is_err(), "{what}");
            assert!(r.entries().is_empty(), "{what}: nothing applied");
        }
        assert!(r.merge(peer(2), &[9], keys()).unwrap_err().contains("malformed"));
    }

    #[test]
    fn size_bound_refuses_whole_payload() {
        let mut r = rec(peer(1), 1);
        let many: Vec<Entry> = (0..MAX_ENTRIES + 1)
            .map(|i| Entry {
                origin: peer(2),
                id: format!("c{i}"),
                name: "web".into(),
                addr: ip("10.0.0.1"),
                version: 1,
                deleted_ms: None,
            })
            .collect();
        let e = r.merge_payload(peer(2), &signed(many[..MAX_ENTRIES].to_vec()), keys());
        assert!(e.is_ok());
        assert_eq!(r.counts().live, MAX_ENTRIES);
        assert!(matches!(
            r.add("mine", "x", ip("10.0.0.2")),
            Err(Error::Full)
        ));
        assert!(r
            .merge_payload(peer(2), &signed(many[MAX_ENTRIES..].to_vec()), keys())
            .is_err());
        // Known keys are fine even when full.
        assert!(r
            .merge_payload(peer(2), &signed(many[..10].to_vec()), keys())
            .unwrap()
            .is_none());
    }

    // ---- signatures ----

    /// The entries of a payload, decoded.
    fn decoded(payload: &[u8]) -> Vec<SignedEntry> {
        Records::decode(payload).unwrap()
    }

    #[test]
    fn own_entries_are_signed_over_all_their_fields() {
        let me = peer(1);
        let mut r = rec(me, 1);
        let add = r.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        let del = r.remove(77, "c", None, None).unwrap();
        for p in [&add, &del, &r.encode_full()] {
            for SignedEntry { entry, sig } in decoded(p) {
                assert!(key_of(me).public().verify(DOMAIN_DNS, &signed_bytes(&entry), &sig));
                assert_eq!(entry.clone().sign(&key_of(me)).sig, sig, "Entry::sign signs the same bytes");
                for altered in [
                    Entry { origin: peer(2), ..entry.clone() },
                    Entry { id: "d".into(), ..entry.clone() },
                    Entry { name: "wet".into(), ..entry.clone() },
                    Entry { addr: ip("10.0.0.2"), ..entry.clone() },
                    Entry { version: entry.version + 1, ..entry.clone() },
                    Entry { deleted_ms: entry.deleted_ms.map_or(Some(1), |d| Some(d + 1)), ..entry.clone() },
                ] {
                    assert!(!key_of(me).public().verify(DOMAIN_DNS, &signed_bytes(&altered), &sig), "{altered:?}");
                }
                assert!(!key_of(me).public().verify(b"weft topology v1", &signed_bytes(&entry), &sig), "domain");
            }
        }
    }

    #[test]
    fn forged_entries_of_another_origin_change_nothing_and_are_counted() {
        let (a, forger) = (peer(1), peer(2));
        let mut origin = rec(a, 1_000);
        let mut b = rec(peer(3), 1);
        b.merge_payload(a, &origin.add("c", "web", ip("10.0.0.1")).unwrap().unwrap(), keys()).unwrap();
        b.merge_payload(a, &origin.add("d", "db", ip("10.0.0.2")).unwrap().unwrap(), keys()).unwrap();
        b.merge_payload(a, &origin.remove(5, "d", None, None).unwrap(), keys()).unwrap();
        let before = state(&b);
        let web = before.iter().find(|e| e.name == "web").unwrap().clone();
        let db = before.iter().find(|e| e.name == "db").unwrap().clone();
        let mut altered = web.clone().sign(&key_of(a));
        altered.entry.addr = ip("10.6.6.6");
        let forgeries = [
            // A new name in a's name, signed by the forger.
            Entry { id: "evil".into(), name: "evil".into(), addr: ip("10.6.6.6"), ..web.clone() }.sign(&key_of(forger)),
            // A tombstone of a's live name.
            Entry { version: web.version + 1, deleted_ms: Some(9), ..web.clone() }.sign(&key_of(forger)),
            // A version bump of a's live name, and of its tombstone (resurrecting it).
            Entry { version: u64::MAX, ..web.clone() }.sign(&key_of(forger)),
            Entry { version: db.version + 1, deleted_ms: None, ..db.clone() }.sign(&key_of(forger)),
            // a's genuine signature over other fields.
            altered,
            // No signature at all.
            SignedEntry { entry: Entry { version: web.version + 5, ..web.clone() }, sig: Signature([0; 64]) },
        ];
        for (n, f) in forgeries.iter().enumerate() {
            assert_eq!(b.merge_payload(forger, &encode_entries(vec![f.clone()]), keys()).unwrap(), None, "{f:?}");
            assert_eq!(state(&b), before, "{f:?}");
            assert_eq!(b.refusals().forged, n as u64 + 1);
        }
        assert_eq!(b.lookup("web"), vec![ip("10.0.0.1")]);
        assert!(b.lookup("evil").is_empty() && b.view().lookup("evil").is_empty());
        assert!(b.poll_output().is_none(), "nothing to send");
        assert_eq!(b.refusals().unverified, 0);
        assert_eq!(
            b.refusals().by_sender.get(&forger),
            Some(&SenderRefusals { forged: forgeries.len() as u64, unverified: 0 })
        );
        // In a payload with honest entries, those merge and only they are passed on.
        let mut honest = rec(forger, 1);
        honest.add("f", "ftp", ip("10.0.0.3")).unwrap();
        let mut mixed = decoded(&honest.encode_full());
        mixed.splice(0..0, forgeries.iter().cloned());
        let delta = b.merge_payload(forger, &encode_entries(mixed), keys()).unwrap().unwrap();
        assert_eq!(decoded(&delta), decoded(&honest.encode_full()));
        assert_eq!(b.lookup("ftp"), vec![ip("10.0.0.3")]);
        assert_eq!(b.lookup("web"), vec![ip("10.0.0.1")]);
        assert_eq!(b.refusals().forged, 2 * forgeries.len() as u64);
    }

    #[test]
    fn replayed_old_entries_change_nothing_and_cost_no_verification() {
        let a = peer(1);
        let mut origin = rec(a, 1);
        let mut b = rec(peer(3), 1);
        let add = origin.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        let del = origin.remove(5, "c", None, None).unwrap();
        let readd = origin.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        for p in [&add, &del, &readd] {
            b.merge_payload(a, p, keys()).unwrap();
        }
        let before = state(&b);
        // Genuine but old: the add and the tombstone the re-add outranks.
        for p in [&add, &del, &readd] {
            assert_eq!(b.merge_payload(peer(2), p, keys()).unwrap(), None);
            assert_eq!(state(&b), before);
        }
        assert_eq!(b.lookup("web"), vec![ip("10.0.0.1")]);
        // Known entries with a bad signature are not even looked at.
        let mut junk = decoded(&readd);
        junk[0].sig = Signature([7; 64]);
        assert_eq!(b.merge_payload(peer(2), &encode_entries(junk), keys()).unwrap(), None);
        assert_eq!(*b.refusals(), Refusals::default(), "nothing was verified");
        // A store that never saw the re-add takes the tombstone, not the replayed add.
        let mut c = rec(peer(4), 1);
        c.merge_payload(peer(2), &del, keys()).unwrap();
        assert_eq!(c.merge_payload(peer(2), &add, keys()).unwrap(), None);
        assert!(c.lookup("web").is_empty());
    }

    #[test]
    fn entries_in_our_name_we_did_not_sign_never_replace_ours() {
        let (me, forger) = (peer(1), peer(2));
        let mut r = rec(me, 1);
        r.add("c", "web", ip("10.0.0.1")).unwrap();
        r.take_dirty();
        let before = state(&r);
        let web = before[0].clone();
        for f in [
            Entry { version: u64::MAX, deleted_ms: Some(1), ..web.clone() },
            Entry { version: web.version + 1, addr: ip("10.6.6.6"), ..web.clone() },
            Entry { id: "evil".into(), name: "evil".into(), ..web.clone() },
            Entry { id: "evil".into(), version: u64::MAX, deleted_ms: Some(1), ..web.clone() },
        ] {
            let p = encode_entries(vec![f.clone().sign(&key_of(forger))]);
            assert_eq!(r.merge_payload(forger, &p, keys()).unwrap(), None, "{f:?}");
            assert_eq!(state(&r), before, "{f:?}");
            assert!(r.poll_output().is_none(), "no re-assertion for a forgery: {f:?}");
            assert!(!r.is_dirty());
        }
        assert_eq!(r.refusals().by_sender.get(&forger).map(|c| c.forged), Some(4));
        // Our versions were not pushed to the top: changes still outrank the past.
        let del = r.remove(9, "c", None, None).unwrap();
        let readd = r.add("c", "web", ip("10.0.0.1")).unwrap().unwrap();
        let (d, a) = (&decoded(&del)[0].entry, &decoded(&readd)[0].entry);
        assert!(d.version < 1_000 && a.version > d.version, "{d:?} {a:?}");
        let mut other = rec(peer(3), 1);
        other.merge_payload(me, &del, keys()).unwrap();
        other.merge_payload(me, &readd, keys()).unwrap();
        assert_eq!(other.lookup("web"), vec![ip("10.0.0.1")]);
    }

    #[test]
    fn entries_of_an_origin_without_a_bound_key_wait_for_it() {
        let stranger = PeerName::from_u64(500);
        let mut s = rec(stranger, 1);
        let full = {
            s.add("c", "web", ip("10.0.0.1")).unwrap();
            s.encode_full()
        };
        let mut r = rec(peer(1), 1);
        assert_eq!(r.merge_payload(peer(2), &full, keys()).unwrap(), None, "not passed on");
        assert!(r.entries().is_empty() && r.lookup("web").is_empty());
        assert_eq!(r.refusals().unverified, 1);
        assert_eq!(r.refusals().forged, 0);
        assert_eq!(r.refusals().by_sender[&peer(2)], SenderRefusals { forged: 0, unverified: 1 });
        let mut bound = keys().clone();
        bound.admit(&weft_proto::identity::Claim::self_signed(&key_of(stranger), stranger)).unwrap();
        assert!(r.merge_payload(peer(2), &full, &bound).unwrap().is_some());
        assert_eq!(r.lookup("web"), vec![ip("10.0.0.1")]);
    }

    #[test]
    fn forged_entries_of_a_gone_origin_are_not_held_for_its_return() {
        let x = peer(5);
        let mut xr = rec(x, 1);
        let mut y = rec(peer(1), 1);
        y.merge_payload(x, &xr.add("c", "web", ip("10.0.0.1")).unwrap().unwrap(), keys()).unwrap();
        y.sync_origins(1_000, |p| p != x);
        let forged = Entry {
            origin: x,
            id: "evil".into(),
            name: "evil".into(),
            addr: ip("10.6.6.6"),
            version: 1,
            deleted_ms: None,
        };
        let p = encode_entries(vec![forged.sign(&key_of(peer(2)))]);
        assert_eq!(y.merge_payload(peer(2), &p, keys()).unwrap(), None);
        assert_eq!(y.counts().quarantined, 1);
        assert_eq!(y.refusals().forged, 1);
        y.sync_origins(2_000, |_| true);
        assert_eq!(y.lookup("web"), vec![ip("10.0.0.1")]);
        assert!(y.lookup("evil").is_empty());
    }

    #[test]
    fn refusals_are_counted_per_sender_up_to_a_bound() {
        let mut r = Refusals::default();
        let bad = Refused::BadSignature { name: peer(1), what: SIGNED_WHAT };
        let unknown = Refused::UnknownKey { name: peer(1) };
        assert_eq!(r.count(peer(2), &bad), 1);
        assert_eq!(r.count(peer(2), &bad), 2);
        assert_eq!(r.count(peer(2), &unknown), 1);
        for n in 0..MAX_SENDERS as u64 + 10 {
            r.count(PeerName::from_u64(1_000 + n), &bad);
        }
        assert_eq!(r.by_sender.len(), MAX_SENDERS);
        assert_eq!(r.forged, 2 + MAX_SENDERS as u64 + 10, "the totals count all");
        assert_eq!(r.unverified, 1);
        assert_eq!(r.count(peer(2), &bad), 3, "known senders still counted");
    }

    /// The largest store there can be fits one payload (and the control
    /// channel's message limit, the same 16 MiB).
    #[test]
    fn a_full_store_of_the_longest_entries_fits_a_payload() {
        let name = [&"a".repeat(63)[..], &"b".repeat(63), &"c".repeat(63), &"d".repeat(61)].join(".");
        assert_eq!(validate_name(&name).unwrap().len(), MAX_NAME_LEN);
        let entries: Vec<SignedEntry> = (0..MAX_ENTRIES)
            .map(|i| SignedEntry {
                entry: Entry {
                    origin: PeerName::from_u64(u64::MAX),
                    id: format!("{i:0>width$}", width = MAX_ID_LEN),
                    name: name.clone(),
                    addr: ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                    version: u64::MAX,
                    deleted_ms: Some(u64::MAX),
                },
                sig: Signature([0xff; 64]),
            })
            .collect();
        let p = encode_entries(entries);
        assert!(p.len() <= MAX_PAYLOAD, "{} bytes", p.len());
        assert_eq!(Records::decode(&p).unwrap().len(), MAX_ENTRIES);
    }

    /// Merge verification throughput: `cargo test --release -p weft-dns --lib
    /// -- --ignored --nocapture verification_rate`.
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::print_stdout)] // the figures are what it is for
    fn verification_rate() {
        const N: usize = 20_000;
        let mut origin = rec(peer(2), 1);
        let t = std::time::Instant::now();
        for i in 0..N {
            origin.add(&format!("{i:064x}"), &format!("name-{i}"), IpAddr::from([10, 32, (i >> 8) as u8, i as u8])).unwrap();
        }
        let sign = t.elapsed();
        let full = origin.encode_full();
        let mut r = rec(peer(1), 1);
        let t = std::time::Instant::now();
        assert!(r.merge_payload(peer(2), &full, keys()).unwrap().is_some());
        let fresh = t.elapsed();
        let t = std::time::Instant::now();
        assert!(r.merge_payload(peer(2), &full, keys()).unwrap().is_none());
        let known = t.elapsed();
        let signed = decoded(&full);
        let t = std::time::Instant::now();
        for e in &signed {
            let m = signed_bytes(&e.entry);
            keys().verify(e.entry.origin, DOMAIN_DNS, &m, &e.sig, SIGNED_WHAT).unwrap();
        }
        let verify = t.elapsed();
        let rate = |d: std::time::Duration| N as f64 / d.as_secs_f64();
        println!(
            "{N} entries: signed {:.0}/s; verified alone {:.0}/s; merged new (verified) {:.0}/s; merged known (not verified) {:.0}/s",
            rate(sign),
            rate(verify),
            rate(fresh),
            rate(known)
        );
        assert_eq!(r.counts().live, N);
    }

    // ---- property tests ----

    #[derive(Clone, Debug)]
    enum Op {
        Add(u8, u8, u8),
        Remove(u8, Option<u8>),
        Snapshot,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u8..3, 0u8..4).prop_map(|(c, n, a)| Op::Add(c, n, a)),
            2 => (0u8..4, proptest::option::of(0u8..3)).prop_map(|(c, n)| Op::Remove(c, n)),
            1 => Just(Op::Snapshot),
        ]
    }

    const NAMES: [&str; 3] = ["web", "db", "api.prod"];

    fn addr(a: u8) -> IpAddr {
        if a == 3 {
            ip("fd00::3")
        } else {
            IpAddr::from([10, 32, 0, a])
        }
    }

    /// Runs each origin's history; returns snapshots (full payloads) taken
    /// along the way and at the end, and each origin's final own live set.
    fn run(histories: &[Vec<Op>]) -> (Vec<Vec<u8>>, BTreeSet<(String, IpAddr)>) {
        let mut snaps = Vec::new();
        let mut live = BTreeSet::new();
        for (i, h) in histories.iter().enumerate() {
            let mut r = rec(peer(i as u64 + 1), 1);
            for (t, o) in h.iter().enumerate() {
                match o {
                    Op::Add(c, n, a) => {
                        r.add(&format!("c{c}"), NAMES[*n as usize], addr(*a))
                            .unwrap();
                    }
                    Op::Remove(c, n) => {
                        r.remove(
                            t as u64,
                            &format!("c{c}"),
                            n.map(|n| NAMES[n as usize]),
                            None,
                        );
                    }
                    Op::Snapshot => snaps.push(r.encode_full()),
                }
            }
            snaps.push(r.encode_full());
            for reg in r.own() {
                live.insert((reg.name, reg.addr));
            }
        }
        (snaps, live)
    }

    fn observer() -> Records {
        rec(peer(100), 1)
    }

    fn merged(payloads: &[&[u8]]) -> Records {
        let mut r = observer();
        for p in payloads {
            r.merge_payload(peer(50), p, keys()).unwrap();
        }
        r
    }

    fn histories() -> impl Strategy<Value = Vec<Vec<Op>>> {
        proptest::collection::vec(proptest::collection::vec(op(), 0..25), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn merge_is_commutative(h in histories(), i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>()) {
            let (s, _) = run(&h);
            let (a, b) = (&s[i.index(s.len())], &s[j.index(s.len())]);
            prop_assert_eq!(state(&merged(&[a, b])), state(&merged(&[b, a])));
        }

        #[test]
        fn merge_is_associative(h in histories(), i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>(), k in any::<prop::sample::Index>()) {
            let (s, _) = run(&h);
            let (a, b, c) = (&s[i.index(s.len())], &s[j.index(s.len())], &s[k.index(s.len())]);
            let ab = merged(&[a, b]).encode_full();
            let bc = merged(&[b, c]).encode_full();
            prop_assert_eq!(state(&merged(&[&ab, c])), state(&merged(&[a, &bc])));
        }

        #[test]
        fn merge_is_idempotent(h in histories(), i in any::<prop::sample::Index>()) {
            let (s, _) = run(&h);
            let a = &s[i.index(s.len())];
            let mut r = merged(&[a]);
            let before = state(&r);
            prop_assert_eq!(r.merge_payload(peer(50), a, keys()).unwrap(), None);
            prop_assert_eq!(state(&r), before.clone());
            let own = r.encode_full();
            prop_assert_eq!(r.merge_payload(peer(50), &own, keys()).unwrap(), None);
            prop_assert_eq!(state(&r), before);
        }

        /// Any order of all snapshots converges to what the origins hold, and
        /// the view agrees with the lookups.
        #[test]
        fn converges_to_the_origins_truth(h in histories(), seed in any::<u64>()) {
            let (mut s, live) = run(&h);
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            s.shuffle(&mut rng);
            let refs: Vec<&[u8]> = s.iter().map(|p| p.as_slice()).collect();
            let r = merged(&refs);
            let mut got = BTreeSet::new();
            for n in NAMES {
                for a in r.lookup(n) {
                    got.insert((n.to_string(), a));
                }
                prop_assert_eq!(r.view().lookup(n), r.lookup(n));
            }
            prop_assert_eq!(got, live);
        }

        /// Deltas returned by merges, passed along a chain, reach the same state
        /// as full states.
        #[test]
        fn deltas_carry_everything(h in histories()) {
            let (s, _) = run(&h);
            let mut a = observer();
            let mut b = rec(peer(101), 1);
            for p in &s {
                if let Some(d) = a.merge_payload(peer(50), p, keys()).unwrap() {
                    b.merge_payload(peer(100), &d, keys()).unwrap();
                }
            }
            prop_assert_eq!(state(&a), state(&b));
        }

        /// Any snapshot re-signed by another key changes nothing in a store
        /// that merged the honest snapshots, and every entry that would have
        /// changed it is counted.
        #[test]
        fn forgeries_change_nothing(h in histories(), i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>()) {
            let (s, _) = run(&h);
            let honest = merged(&[&s[i.index(s.len())]]);
            let mut r = merged(&[&s[i.index(s.len())]]);
            let forged: Vec<SignedEntry> = decoded(&s[j.index(s.len())])
                .into_iter()
                .map(|e| e.entry.sign(&key_of(peer(99))))
                .collect();
            prop_assert_eq!(r.merge_payload(peer(99), &encode_entries(forged.clone()), keys()).unwrap(), None);
            prop_assert_eq!(state(&r), state(&honest));
            let would_change = forged.iter().filter(|f| {
                !state(&honest).iter().any(|e| e.origin == f.entry.origin && e.id == f.entry.id
                    && e.name == f.entry.name && e.addr == f.entry.addr
                    && (e.version, e.deleted_ms.is_some(), e.deleted_ms.unwrap_or(0))
                        >= (f.entry.version, f.entry.deleted_ms.is_some(), f.entry.deleted_ms.unwrap_or(0)))
            }).count() as u64;
            prop_assert_eq!(r.refusals().forged, would_change);
        }

        /// Garbage never panics and never changes anything.
        #[test]
        fn garbage_is_harmless(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = observer();
            if r.merge_payload(peer(50), &bytes, keys()).is_err() {
                prop_assert!(r.entries().is_empty());
            }
        }
    }
}
