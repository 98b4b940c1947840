//! The ring: one address range cut into pieces, each owned by a peer.
//!
//! The ring is a sorted list of *tokens*. Each entry owns the addresses from
//! its token up to the next token (the last one up to the end of the range),
//! and carries its owner, a version and the owner's count of free addresses
//! in it. The first token is always the range's first address.
//!
//! Only the owner of a piece changes it: to split it (a new token inside its
//! own space), to give part of it away, or to update its free count; each
//! change bumps the entry's version. `weft rmpeer` is the one exception: it
//! takes over a dead peer's entries, again with a bumped version.
//!
//! Merging two rings is a join: the union of their tokens, and for a token in
//! both, the entry with the higher version. Tokens are never removed. So
//! [`Ring::join`] is commutative, associative and idempotent (the property
//! tests check this on rings built by random histories). Two rings that were
//! started from different seeds, or over different ranges, never merge;
//! neither do two entries with the same token and version but different
//! contents (only possible when two peers both believe they own a piece, as
//! after an `rmpeer` of a peer that was still alive). [`Ring::merge`] adds the
//! local rule: a peer never accepts a merge that takes space away from it.
//!
//! # Signed entries: the rules
//!
//! The common root is the seed ring ([`Ring::from_seeds`]), which every peer
//! computes from the agreed seeds; its entries (version 0) carry no signature.
//! Every other version of every entry is signed, and carries the proof of how
//! its owner came to own it:
//!
//! 1. **Origin.** A token is either a seed token (its first owner is the seed
//!    ring's) or was made by a split: [`Origin::Split`] names the token of the
//!    piece it was cut from (`parent`, lower) and its creator, who signs
//!    `(range, seeds, token, parent)` ([`DOMAIN_SPLIT`]). The creator must
//!    appear among the owners of the parent's chain (rule 2) in the ring being
//!    merged.
//! 2. **Chain.** `links` lists every change of owner since the origin, oldest
//!    first, at most [`MAX_LINKS`]. A [`LinkKind::Grant`] is signed by the
//!    owner before it (a donation, a hand-over); a [`LinkKind::Takeover`]
//!    (`weft rmpeer`) is signed by the taker. Each signs `(range, seeds,
//!    token, position, version, to, kind)` ([`DOMAIN_LINK`]); versions rise
//!    along the chain, and the entry's owner is the last link's `to`.
//! 3. **Version.** The entry as a whole (`range, seeds, token, owner,
//!    version, free, origin, links`) is signed ([`DOMAIN_ENTRY`]) by its
//!    writer: the signer of the last link when the version is that link's (the
//!    donor wrote it), else the owner. So only the owner updates its free
//!    counts, and nobody writes an entry for another owner without that
//!    owner's grant.
//! 4. **No rewriting history.** When two versions of one token meet in a
//!    join, the lower one's origin and chain must be a prefix of the higher
//!    one's ([`RingError::Forked`] otherwise): a former owner cannot roll a
//!    piece back to itself by signing a higher version that leaves out the
//!    grant it made.
//! 5. **Takeover.** A receiver accepts a takeover link it did not know only
//!    when the peer taken over is unreachable from it (the allocator passes
//!    the peers its routes reach); otherwise the ring is refused and comes
//!    back by anti-entropy once that peer is gone.
//! 6. **Checked once, refused whole.** [`Ring::merge_signed`] checks every
//!    entry of the joined ring that is not already ours, against the keys
//!    bound to the signers' names; one entry that fails refuses the whole
//!    ring ([`RingError::Forged`], nothing merged, nothing passed on). Our
//!    own saved ring is trusted as it is (it was checked when it came in).
//! 7. **Bound.** A piece that changed hands [`MAX_LINKS`] times cannot be
//!    given away again (give, hand-over and takeover refuse, naming it);
//!    the donor gives from another run. Ownership changes only by donation,
//!    hand-over and rmpeer, so a token rarely has more than a few links.
//!
//! Known gap: a peer that once owned a piece signed grants for it, and can
//! sign a split inside it dated before its grant (rule 1 checks that the
//! creator owned the parent at some time, not when): it needs a
//! malicious former owner, is visible (signed; the grantee refuses it as lost
//! space, every other peer accepts it), and is left for a later step: closing
//! it needs the creation ordered against the creator's grants.
//!
//! Known gap: rule 5 judges "gone" by this receiver's routes, so during a
//! partition a password holder can take over the space of a peer on the other
//! side, and its side accepts; the victim refuses it when the partition heals
//! (lost space), and the takeover stays attributable (signed by the taker).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use weft_proto::identity::{signed_bytes, Refused, Signature};
use weft_proto::{Keys, PeerName, SigningKey};

use crate::addr::{ip, Cidr};

/// Most entries a ring may have (a bound on what a peer accepts).
pub const MAX_ENTRIES: usize = 1 << 16;
/// Most changes of owner one token's chain may record (see rule 7).
pub const MAX_LINKS: usize = 32;
/// Domain label of an entry version's signature.
pub const DOMAIN_ENTRY: &[u8] = b"weft ipam ring entry v1";
/// Domain label of a change of owner's signature.
pub const DOMAIN_LINK: &[u8] = b"weft ipam ring grant v1";
/// Domain label of a split's signature.
pub const DOMAIN_SPLIT: &[u8] = b"weft ipam ring split v1";

/// How a token came to exist.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A token of the seed ring.
    #[default]
    Seed,
    /// Cut by `creator` from the piece of token `parent`.
    Split {
        /// The token of the piece it was cut from.
        parent: u32,
        /// Who cut it (then the owner of `parent`).
        creator: PeerName,
        /// The creator's signature of `(range, seeds, token, parent)`.
        sig: Signature,
    },
}

/// How the owner changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    /// Given by the owner before (donation, hand-over): signed by the giver.
    Grant,
    /// Taken over from a gone peer (`weft rmpeer`): signed by the taker.
    Takeover,
}

/// One change of owner of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The entry's version from this change on.
    pub version: u32,
    /// The new owner.
    pub to: PeerName,
    /// Grant or takeover.
    pub kind: LinkKind,
    /// See [`LinkKind`] for whose.
    pub sig: Signature,
}

/// One piece of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// First address of the piece.
    pub token: u32,
    /// Its owner.
    pub peer: PeerName,
    /// Bumped on every change.
    pub version: u32,
    /// Free addresses in the piece, as its owner last said.
    pub free: u32,
    /// How the token came to exist.
    #[serde(default)]
    pub origin: Origin,
    /// Every change of owner since, oldest first.
    #[serde(default)]
    pub links: Vec<Link>,
    /// The writer's signature of this version; `None` only for a seed entry
    /// at version 0 (every peer computes it).
    #[serde(default)]
    pub sig: Option<Signature>,
}

impl Entry {
    /// The first owner: the seed ring's, or the creator.
    fn first_owner(&self, seed: Option<PeerName>) -> Option<PeerName> {
        match &self.origin {
            Origin::Seed => seed,
            Origin::Split { creator, .. } => Some(*creator),
        }
    }

    /// Every owner along the chain, first one first.
    fn owners(&self, seed: Option<PeerName>) -> Vec<PeerName> {
        self.first_owner(seed).into_iter().chain(self.links.iter().map(|l| l.to)).collect()
    }

    /// Who must have signed this version: the last link's signer when the
    /// version is that link's, else the owner.
    fn writer(&self, seed: Option<PeerName>) -> Option<PeerName> {
        match self.links.last() {
            Some(l) if l.version == self.version => match l.kind {
                LinkKind::Takeover => Some(l.to),
                LinkKind::Grant => {
                    let n = self.links.len();
                    if n >= 2 {
                        Some(self.links[n - 2].to)
                    } else {
                        self.first_owner(seed)
                    }
                }
            },
            _ => Some(self.peer),
        }
    }

    /// Whether `older` is an earlier version of this same history (rule 4).
    fn extends(&self, older: &Entry) -> bool {
        self.origin == older.origin && self.links.len() >= older.links.len() && self.links[..older.links.len()] == older.links[..]
    }
}

/// The ring. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    range: Cidr,
    seeds: Vec<PeerName>,
    entries: Vec<Entry>,
}

/// Why two rings do not merge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peers were configured with different ranges.
    #[error("the peer's ring covers {theirs} but ours covers {ours}: every peer must use the same --ipalloc-range")]
    DifferentRange {
        /// Ours.
        ours: Cidr,
        /// Theirs.
        theirs: Cidr,
    },
    /// The rings were started separately.
    #[error("the peer's ring was started by seeds {theirs} but ours by {ours}: these are two separate meshes, which cannot share one range (reset one of them with `weft reset`)")]
    DifferentSeeds {
        /// Ours.
        ours: Names,
        /// Theirs.
        theirs: Names,
    },
    /// The payload breaks the ring's rules.
    #[error("invalid ring: {0}")]
    Invalid(String),
    /// Two different entries claim the same version of one token.
    #[error("inconsistent entries for {token}: ours is owned by {ours} and theirs by {theirs}, both at version {version} (was a live peer removed with rmpeer?)")]
    Inconsistent {
        /// The token's address.
        token: std::net::Ipv4Addr,
        /// Our entry's owner.
        ours: PeerName,
        /// Theirs.
        theirs: PeerName,
        /// The version both have.
        version: u32,
    },
    /// Two versions of a token with different histories (rule 4).
    #[error("the entry for {token} at version {version} (owner {theirs}) rewrites the history of ours at version {ours_version} (owner {ours}): its chain of owners does not extend ours, so someone signed two different futures for it")]
    Forked {
        /// The token's address.
        token: std::net::Ipv4Addr,
        /// Our owner.
        ours: PeerName,
        /// Our version.
        ours_version: u32,
        /// Theirs.
        theirs: PeerName,
        /// Their version.
        version: u32,
    },
    /// An entry's signatures do not prove it (see the module docs' rules).
    #[error("the entry for {token} (owner {owner}, version {version}) does not verify: {why}")]
    Forged {
        /// The token's address.
        token: std::net::Ipv4Addr,
        /// Who the entry says owns it.
        owner: PeerName,
        /// Its version.
        version: u32,
        /// A label for metrics: a [`Refused::label`], `bad_grant` or `takeover_of_reachable`.
        reason: &'static str,
        /// What failed.
        why: String,
    },
    /// The merge would give away space we own.
    #[error("the peer's ring gives {start}..{end}, which this peer owns, to {to}: refused (was this peer removed with rmpeer while it was alive?)")]
    LostSpace {
        /// First address of the lost piece.
        start: std::net::Ipv4Addr,
        /// Last address of the lost piece.
        end: std::net::Ipv4Addr,
        /// Who the peer's ring says owns it.
        to: PeerName,
    },
}

/// A list of peer names, written comma-separated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names(pub Vec<PeerName>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// A piece of the ring: `[start, end)` and its entry.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The entry that owns it.
    pub entry: &'a Entry,
}

impl Ring {
    /// A ring that nobody has started yet.
    pub fn empty(range: Cidr) -> Ring {
        Ring { range, seeds: Vec::new(), entries: Vec::new() }
    }

    /// The ring every peer computes from the same seed list: the range cut
    /// into equal consecutive pieces, one per seed in name order.
    pub fn from_seeds(range: Cidr, seeds: &[PeerName]) -> Ring {
        let mut seeds = seeds.to_vec();
        seeds.sort();
        seeds.dedup();
        let n = seeds.len() as u64;
        let mut entries = Vec::with_capacity(seeds.len());
        if let Some(each) = range.size().checked_div(n) {
            let extra = range.size() % n;
            let mut start = u64::from(range.addr);
            for (i, s) in seeds.iter().enumerate() {
                let len = each + u64::from((i as u64) < extra);
                if len == 0 {
                    break;
                }
                entries.push(Entry {
                    token: start as u32,
                    peer: *s,
                    version: 0,
                    free: len.min(u64::from(u32::MAX)) as u32,
                    origin: Origin::Seed,
                    links: Vec::new(),
                    sig: None,
                });
                start += len;
            }
        }
        Ring { range, seeds, entries }
    }

    /// The whole range.
    pub fn range(&self) -> Cidr {
        self.range
    }

    /// The peers that started the ring.
    pub fn seeds(&self) -> &[PeerName] {
        &self.seeds
    }

    /// Whether nobody has started the ring yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in token order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The pieces, in address order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> + '_ {
        let end = self.range.end();
        self.entries.iter().enumerate().map(move |(i, e)| Piece {
            start: u64::from(e.token),
            end: self.entries.get(i + 1).map_or(end, |n| u64::from(n.token)),
            entry: e,
        })
    }

    /// The pieces a peer owns, adjacent ones joined, in address order.
    pub fn owned(&self, peer: PeerName) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in self.pieces().filter(|p| p.entry.peer == peer) {
            match out.last_mut() {
                Some(last) if last.1 == p.start => last.1 = p.end,
                _ => out.push((p.start, p.end)),
            }
        }
        out
    }

    /// Who owns `addr`; `None` outside the range or before the ring starts.
    pub fn owner(&self, addr: u32) -> Option<PeerName> {
        if !self.range.contains(addr) {
            return None;
        }
        let i = self.entries.partition_point(|e| e.token <= addr);
        i.checked_sub(1).map(|i| self.entries[i].peer)
    }

    /// Per peer: addresses owned, and free as their owners last said.
    pub fn shares(&self) -> BTreeMap<PeerName, (u64, u64)> {
        let mut m: BTreeMap<PeerName, (u64, u64)> = BTreeMap::new();
        for p in self.pieces() {
            let s = m.entry(p.entry.peer).or_default();
            s.0 += p.end - p.start;
            s.1 += u64::from(p.entry.free);
        }
        m
    }

    /// Checks the ring's rules: tokens strictly increasing and inside the
    /// range, the first at its start, free counts no larger than their
    /// pieces, seeds sorted and present whenever entries are.
    pub fn validate(&self) -> Result<(), String> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(format!("{} entries (at most {MAX_ENTRIES})", self.entries.len()));
        }
        if self.seeds.len() > MAX_ENTRIES {
            return Err(format!("{} seeds", self.seeds.len()));
        }
        if self.seeds.windows(2).any(|w| w[0] >= w[1]) {
            return Err("seeds not sorted".into());
        }
        let Some(first) = self.entries.first() else {
            return Ok(());
        };
        if self.seeds.is_empty() {
            return Err("entries without seeds".into());
        }
        if first.token != self.range.addr {
            return Err(format!("first token {} is not the start of {}", ip(first.token), self.range));
        }
        if self.entries.windows(2).any(|w| w[0].token >= w[1].token) {
            return Err("tokens not strictly increasing".into());
        }
        for p in self.pieces() {
            if !self.range.contains(p.entry.token) {
                return Err(format!("token {} outside {}", ip(p.entry.token), self.range));
            }
            if u64::from(p.entry.free) > p.end - p.start {
                return Err(format!("{} free in a piece of {} at {}", p.entry.free, p.end - p.start, ip(p.entry.token)));
            }
        }
        Ok(())
    }

    /// The join of two rings (see the module docs). Both must be valid.
    pub fn join(a: &Ring, b: &Ring) -> Result<Ring, RingError> {
        if a.range != b.range {
            return Err(RingError::DifferentRange { ours: a.range, theirs: b.range });
        }
        if a.entries.is_empty() {
            return Ok(b.clone());
        }
        if b.entries.is_empty() {
            return Ok(a.clone());
        }
        if a.seeds != b.seeds {
            return Err(RingError::DifferentSeeds { ours: Names(a.seeds.clone()), theirs: Names(b.seeds.clone()) });
        }
        let mut out = Vec::with_capacity(a.entries.len().max(b.entries.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.entries.len() || j < b.entries.len() {
            match (a.entries.get(i), b.entries.get(j)) {
                (Some(x), Some(y)) if x.token == y.token => {
                    if x.version == y.version && x != y {
                        return Err(RingError::Inconsistent {
                            token: ip(x.token),
                            ours: x.peer,
                            theirs: y.peer,
                            version: x.version,
                        });
                    }
                    let (hi, lo) = if y.version > x.version { (y, x) } else { (x, y) };
                    if !hi.extends(lo) {
                        return Err(RingError::Forked {
                            token: ip(x.token),
                            ours: x.peer,
                            ours_version: x.version,
                            theirs: y.peer,
                            version: y.version,
                        });
                    }
                    out.push(if y.version > x.version { y.clone() } else { x.clone() });
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.token < y.token => {
                    out.push(x.clone());
                    i += 1;
                }
                (Some(x), None) => {
                    out.push(x.clone());
                    i += 1;
                }
                (_, Some(y)) => {
                    out.push(y.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let r = Ring { range: a.range, seeds: a.seeds.clone(), entries: out };
        r.validate().map_err(RingError::Invalid)?;
        Ok(r)
    }

    /// Merges a ring received from a peer into ours, as peer `me`. Refuses
    /// (changing nothing) what [`Ring::join`] refuses, any entry of theirs
    /// whose signatures do not prove it against `keys` or that takes over a
    /// peer in `reachable` (rules 1–6 in the module docs), and anything that
    /// would take away space `me` owns. Returns whether our ring changed.
    pub fn merge(&mut self, other: &Ring, me: PeerName, keys: &Keys, reachable: &BTreeSet<PeerName>) -> Result<bool, RingError> {
        other.validate().map_err(RingError::Invalid)?;
        let joined = Ring::join(self, other)?;
        if joined == *self {
            return Ok(false);
        }
        let seed = Ring::from_seeds(joined.range, &joined.seeds);
        for e in &joined.entries {
            let ours = self.entry_at(e.token);
            if ours == Some(e) {
                continue;
            }
            let forged = |reason: &'static str, why: String| RingError::Forged {
                token: ip(e.token),
                owner: e.peer,
                version: e.version,
                reason,
                why,
            };
            joined.check_entry(e, ours, &seed, keys).map_err(|(reason, why)| forged(reason, why))?;
            // Rule 5: a takeover we did not know, of a peer we can reach.
            let seed_owner = seed.entry_at(e.token).map(|s| s.peer);
            let owners = e.owners(seed_owner);
            let known = ours.map_or(0, |o| o.links.len());
            for (i, l) in e.links.iter().enumerate().skip(known) {
                if l.kind == LinkKind::Takeover && reachable.contains(&owners[i]) {
                    return Err(forged(
                        "takeover_of_reachable",
                        format!("{} took it over from {}, which this peer still reaches", l.to, owners[i]),
                    ));
                }
            }
        }
        for (start, end) in self.owned(me) {
            for p in joined.pieces() {
                if p.end > start && p.start < end && p.entry.peer != me {
                    return Err(RingError::LostSpace {
                        start: ip(p.start.max(start) as u32),
                        end: ip((p.end.min(end) - 1) as u32),
                        to: p.entry.peer,
                    });
                }
            }
        }
        *self = joined;
        Ok(true)
    }

    /// The entry with this token.
    fn entry_at(&self, token: u32) -> Option<&Entry> {
        self.entries.binary_search_by_key(&token, |e| e.token).ok().map(|i| &self.entries[i])
    }

    fn entry_bytes(&self, e: &Entry) -> Vec<u8> {
        signed_bytes(&(self.range, &self.seeds, e.token, e.peer, e.version, e.free, &e.origin, &e.links))
    }

    fn link_bytes(&self, token: u32, pos: usize, version: u32, to: PeerName, kind: LinkKind) -> Vec<u8> {
        signed_bytes(&(self.range, &self.seeds, token, pos as u64, version, to, kind))
    }

    fn split_bytes(&self, token: u32, parent: u32) -> Vec<u8> {
        signed_bytes(&(self.range, &self.seeds, token, parent))
    }

    /// Signs entry `i` as its writer.
    fn sign_entry(&mut self, i: usize, key: &SigningKey) {
        let sig = key.sign(DOMAIN_ENTRY, &self.entry_bytes(&self.entries[i]));
        self.entries[i].sig = Some(sig);
    }

    /// Checks one entry of this ring against the rules (module docs), with
    /// `seed` the seed ring. `ours` is our (checked) version of it, whose
    /// origin and chain the join already found to be a prefix of this one's:
    /// only what is new is checked. Errs with a reason label and what failed.
    fn check_entry(&self, e: &Entry, ours: Option<&Entry>, seed: &Ring, keys: &Keys) -> Result<(), (&'static str, String)> {
        let bad = |why: String| ("bad_grant", why);
        let refused = |r: Refused| (r.label(), r.to_string());
        let seed_entry = seed.entry_at(e.token);
        let seed_owner = seed_entry.map(|s| s.peer);
        let Some(sig) = &e.sig else {
            return if seed_entry == Some(e) { Ok(()) } else { Err(bad("unsigned, and not the seed ring's entry".into())) };
        };
        if e.links.len() > MAX_LINKS {
            return Err(bad(format!("{} changes of owner (at most {MAX_LINKS})", e.links.len())));
        }
        match &e.origin {
            _ if ours.is_some() => {}
            Origin::Seed if seed_owner.is_none() => return Err(bad("claims to be a seed token, which it is not".into())),
            Origin::Seed => {}
            Origin::Split { parent, creator, sig } => {
                if *parent >= e.token {
                    return Err(bad(format!("cut from {}, which is not below it", ip(*parent))));
                }
                keys.verify(*creator, DOMAIN_SPLIT, &self.split_bytes(e.token, *parent), sig, "ring split").map_err(refused)?;
                let Some(p) = self.entry_at(*parent) else {
                    return Err(bad(format!("cut from {}, which is not in the ring", ip(*parent))));
                };
                if !p.owners(seed.entry_at(*parent).map(|s| s.peer)).contains(creator) {
                    return Err(bad(format!("cut by {creator} from {}, which {creator} never owned", ip(*parent))));
                }
            }
        }
        let Some(mut prev) = e.first_owner(seed_owner) else {
            return Err(bad("no first owner".into()));
        };
        let mut last = 0;
        let known = ours.map_or(0, |o| o.links.len());
        for (i, l) in e.links.iter().enumerate() {
            if l.version <= last {
                return Err(bad("versions of its changes of owner do not rise".into()));
            }
            if i < known {
                (last, prev) = (l.version, l.to);
                continue;
            }
            let signer = match l.kind {
                LinkKind::Grant => prev,
                LinkKind::Takeover => l.to,
            };
            let what = if l.kind == LinkKind::Grant { "ring grant" } else { "ring takeover" };
            keys.verify(signer, DOMAIN_LINK, &self.link_bytes(e.token, i, l.version, l.to, l.kind), &l.sig, what)
                .map_err(refused)?;
            last = l.version;
            prev = l.to;
        }
        if e.peer != prev || e.version < last {
            return Err(bad(format!("its chain of owners ends with {prev} at version {last}")));
        }
        let Some(writer) = e.writer(seed_owner) else { return Err(bad("no writer".into())) };
        keys.verify(writer, DOMAIN_ENTRY, &self.entry_bytes(e), sig, "ring entry").map_err(refused)
    }

    /// Whether entry `i` may change hands again (rule 7).
    fn can_relink(&self, i: usize) -> Result<(), String> {
        let e = &self.entries[i];
        if e.links.len() >= MAX_LINKS {
            return Err(format!(
                "the piece at {} has changed owner {MAX_LINKS} times, the most a ring entry records",
                ip(e.token)
            ));
        }
        Ok(())
    }

    /// Entry `i` changes owner to `to`, signed by `key` (the giver's for a
    /// grant, the taker's for a takeover), at the next version.
    fn relink(&mut self, i: usize, key: &SigningKey, to: PeerName, kind: LinkKind, free: Option<u32>) {
        let (token, pos, version) = (self.entries[i].token, self.entries[i].links.len(), self.entries[i].version + 1);
        let sig = key.sign(DOMAIN_LINK, &self.link_bytes(token, pos, version, to, kind));
        let en = &mut self.entries[i];
        en.links.push(Link { version, to, kind, sig });
        en.peer = to;
        en.version = version;
        if let Some(f) = free {
            en.free = f;
        }
        self.sign_entry(i, key);
    }

    /// Puts a token at `at` if there is none, inside a piece `me` owns (the
    /// new entry is ours, cut from that piece and signed with `key`). Returns
    /// false when `at` is inside another's piece.
    fn split(&mut self, at: u64, me: PeerName, key: &SigningKey) -> bool {
        if at <= u64::from(self.range.addr) || at >= self.range.end() {
            return true;
        }
        let at32 = at as u32;
        let i = self.entries.partition_point(|e| e.token <= at32);
        let Some(owner) = i.checked_sub(1).map(|k| &self.entries[k]) else { return false };
        if owner.token == at32 {
            return true;
        }
        if owner.peer != me {
            return false;
        }
        // The old entry's piece shrinks: keep its free count within it (a
        // change of content, so a new version).
        let k = i - 1;
        let parent = self.entries[k].token;
        let size = (at - u64::from(parent)).min(u64::from(u32::MAX)) as u32;
        if self.entries[k].free > size {
            self.entries[k].free = size;
            self.entries[k].version += 1;
            self.sign_entry(k, key);
        }
        let origin = Origin::Split { parent, creator: me, sig: key.sign(DOMAIN_SPLIT, &self.split_bytes(at32, parent)) };
        self.entries.insert(i, Entry { token: at32, peer: me, version: 0, free: 0, origin, links: Vec::new(), sig: None });
        self.sign_entry(i, key);
        true
    }

    /// Gives `[start, end)`, which `me` must own entirely, to `to`, signing
    /// the grants with `key` (`me`'s). The piece is marked all free (only free
    /// space is given). Returns an error and changes nothing when part of it
    /// is not ours, or a piece in it cannot change hands again (rule 7).
    pub fn give(&mut self, key: &SigningKey, me: PeerName, to: PeerName, start: u64, end: u64) -> Result<(), String> {
        if start >= end || start < u64::from(self.range.addr) || end > self.range.end() {
            return Err(format!("bad range to give: {start}..{end}"));
        }
        if self.pieces().any(|p| p.end > start && p.start < end && p.entry.peer != me) {
            return Err(format!("{}..{} is not all ours to give", ip(start as u32), ip((end - 1) as u32)));
        }
        let before = self.clone();
        if !self.split(start, me, key) || !self.split(end, me, key) {
            *self = before;
            return Err("cannot split the ring there".into());
        }
        let range_end = self.range.end();
        let inside: Vec<(usize, u64)> = (0..self.entries.len())
            .filter_map(|i| {
                let s = u64::from(self.entries[i].token);
                let e = self.entries.get(i + 1).map_or(range_end, |x| u64::from(x.token));
                (s >= start && e <= end).then_some((i, e - s))
            })
            .collect();
        if let Some(Err(why)) = inside.iter().map(|&(i, _)| self.can_relink(i)).find(Result::is_err) {
            *self = before;
            return Err(why);
        }
        for (i, size) in inside {
            self.relink(i, key, to, LinkKind::Grant, Some(size.min(u64::from(u32::MAX)) as u32));
        }
        Ok(())
    }

    /// Gives every piece of `me` to `to` (a hand-over: `weft reset`), the
    /// grants signed with `key` (`me`'s). Returns the number of addresses
    /// moved; errs, changing nothing, when a piece cannot change hands again.
    pub fn hand_over(&mut self, key: &SigningKey, me: PeerName, to: PeerName) -> Result<u64, String> {
        self.move_all(key, me, to, LinkKind::Grant)
    }

    /// Takes every piece of `from` over for `me` (`weft rmpeer`), the
    /// takeovers signed with `key` (`me`'s). Returns the number of addresses
    /// moved; errs, changing nothing, when a piece cannot change hands again.
    pub fn take_over(&mut self, key: &SigningKey, me: PeerName, from: PeerName) -> Result<u64, String> {
        self.move_all(key, from, me, LinkKind::Takeover)
    }

    fn move_all(&mut self, key: &SigningKey, from: PeerName, to: PeerName, kind: LinkKind) -> Result<u64, String> {
        let range_end = self.range.end();
        let mine: Vec<(usize, u64)> = (0..self.entries.len())
            .filter(|&i| self.entries[i].peer == from)
            .map(|i| (i, self.entries.get(i + 1).map_or(range_end, |x| u64::from(x.token)) - u64::from(self.entries[i].token)))
            .collect();
        for &(i, _) in &mine {
            self.can_relink(i)?;
        }
        let mut moved = 0;
        for (i, size) in mine {
            moved += size;
            self.relink(i, key, to, kind, None);
        }
        Ok(moved)
    }

    /// Sets the free count of our entry at `token`, signed with `key`.
    /// Returns whether it changed.
    pub fn set_free(&mut self, key: &SigningKey, me: PeerName, token: u32, free: u32) -> bool {
        match self.entries.iter().position(|e| e.token == token && e.peer == me) {
            Some(i) if self.entries[i].free != free => {
                self.entries[i].free = free;
                self.entries[i].version += 1;
                self.sign_entry(i, key);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::identity::Claim;
    use weft_proto::Trust;

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }
    fn k(i: u64) -> SigningKey {
        SigningKey::from_seed(&[i as u8; 32]).expect("key")
    }
    /// Peers 1..=9 bound to their keys.
    fn keys() -> Keys {
        let mut keys = Keys::new(Trust::FirstUse);
        for i in 1..=9 {
            keys.admit(&Claim::self_signed(&k(i), n(i))).expect("admit");
        }
        keys
    }
    fn none() -> BTreeSet<PeerName> {
        BTreeSet::new()
    }
    fn range() -> Cidr {
        Cidr { addr: 0x0a20_0000, prefix: 24 }
    }
    fn merge(r: &mut Ring, other: &Ring, me: u64) -> Result<bool, RingError> {
        r.merge(other, n(me), &keys(), &none())
    }
    fn reason(e: Result<bool, RingError>) -> &'static str {
        match e {
            Err(RingError::Forged { reason, .. }) => reason,
            Err(RingError::Forked { .. }) => "forked",
            other => panic!("not refused as forged: {other:?}"),
        }
    }

    #[test]
    fn seeds_split_evenly_and_owner_lookup() {
        let r = Ring::from_seeds(range(), &[n(3), n(1), n(2)]);
        r.validate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.entries().len(), 3);
        let sh = r.shares();
        assert_eq!(sh[&n(1)].0 + sh[&n(2)].0 + sh[&n(3)].0, 256);
        assert_eq!(r.owner(0x0a20_0000), Some(n(1)));
        assert_eq!(r.owner(0x0a20_00ff), Some(n(3)));
        assert_eq!(r.owner(0x0a21_0000), None);
        assert_eq!(Ring::empty(range()).owner(0x0a20_0000), None);
    }

    #[test]
    fn give_moves_space_and_merge_accepts_it() {
        let mut a = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut b = a.clone();
        let (s, e) = a.owned(n(1))[0];
        a.give(&k(1), n(1), n(2), s + 10, s + 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.owner((s + 10) as u32), Some(n(2)));
        assert_eq!(a.owner((s + 20) as u32), Some(n(1)));
        assert_eq!(a.owner((s + 9) as u32), Some(n(1)));
        assert!(e > s + 20);
        assert_eq!(merge(&mut b, &a, 2), Ok(true));
        assert_eq!(b, a);
        assert_eq!(merge(&mut b, &a, 2), Ok(false));
        // Giving what is not ours fails and changes nothing.
        let before = a.clone();
        assert!(a.give(&k(1), n(1), n(3), s + 5, s + 15).is_err());
        assert_eq!(a, before);
    }

    #[test]
    fn merge_refuses_taking_our_space() {
        let mut a = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut other = a.clone();
        other.take_over(&k(2), n(2), n(1)).expect("take over");
        let before = a.clone();
        assert!(matches!(merge(&mut a, &other, 1), Err(RingError::LostSpace { .. })));
        assert_eq!(a, before);
        // Peer 3 has no space at stake and takes the change (1 is not reachable from it).
        let mut c = before.clone();
        assert_eq!(merge(&mut c, &other, 3), Ok(true));
    }

    #[test]
    fn different_seeds_and_ranges_refuse() {
        let mut a = Ring::from_seeds(range(), &[n(1)]);
        let b = Ring::from_seeds(range(), &[n(2)]);
        let e = merge(&mut a, &b, 1).err().unwrap_or_else(|| panic!("merged"));
        assert!(matches!(e, RingError::DifferentSeeds { .. }), "{e}");
        assert!(e.to_string().contains("two separate meshes"));
        let c = Ring::from_seeds(Cidr { addr: 0x0a30_0000, prefix: 24 }, &[n(1)]);
        assert!(matches!(merge(&mut a, &c, 1), Err(RingError::DifferentRange { .. })));
        // An empty ring takes any valid ring over the same range.
        let mut e = Ring::empty(range());
        assert_eq!(merge(&mut e, &b, 1), Ok(true));
    }

    #[test]
    fn invalid_rings_refused() {
        let mut good = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut bad = good.clone();
        bad.entries.swap(0, 1);
        assert!(matches!(merge(&mut good, &bad, 1), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.entries[0].token += 1;
        assert!(matches!(merge(&mut good, &bad, 3), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.entries[0].free = 100_000;
        assert!(matches!(merge(&mut good, &bad, 3), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.seeds.clear();
        assert!(matches!(merge(&mut good, &bad, 3), Err(RingError::Invalid(_))));
    }

    #[test]
    fn same_version_different_owner_is_inconsistent() {
        let base = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut a = base.clone();
        let mut b = base.clone();
        a.take_over(&k(3), n(3), n(1)).expect("take over");
        b.take_over(&k(4), n(4), n(1)).expect("take over");
        assert!(matches!(Ring::join(&a, &b), Err(RingError::Inconsistent { .. })));
    }

    /// A → B → C: a receiver that knew only A's version accepts C's, proved
    /// by the chain of grants the entry carries.
    #[test]
    fn a_chain_of_grants_verifies_for_a_receiver_that_missed_the_middle() {
        let seed = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut r = seed.clone();
        let (s, _) = r.owned(n(1))[0];
        r.give(&k(1), n(1), n(2), s + 8, s + 16).expect("give to 2");
        r.give(&k(2), n(2), n(3), s + 8, s + 12).expect("give on to 3");
        r.set_free(&k(3), n(3), (s + 8) as u32, 1);
        let mut late = seed.clone();
        assert_eq!(merge(&mut late, &r, 4), Ok(true));
        assert_eq!(late.owner((s + 9) as u32), Some(n(3)));
        let e = late.entry_at((s + 8) as u32).expect("entry");
        assert_eq!(e.owners(None), vec![n(1), n(2), n(3)]);
    }

    /// Peer 9 holds the password and a bound key, and tries every way of
    /// writing entries it has no right to: each is refused whole, changing
    /// nothing, with its reason.
    #[test]
    fn forged_entries_change_nothing() {
        let seed = Ring::from_seeds(range(), &[n(1), n(2)]);
        let (s, _) = seed.owned(n(1))[0];
        let t = s as u32;
        let mut honest = seed.clone();
        honest.give(&k(1), n(1), n(2), s + 100, s + 110).expect("give");
        let check = |forged: &Ring, want: &'static str| {
            for me in [1, 2, 3] {
                let mut r = honest.clone();
                assert_eq!(reason(merge(&mut r, forged, me)), want, "peer {me}");
                assert_eq!(r, honest, "peer {me}: a refused ring changed ours");
            }
        };
        // 1. An entry of peer 1's, rewritten to 9 and signed by 9 as its writer.
        let mut f = honest.clone();
        let i = f.entries.iter().position(|e| e.token == t).expect("entry");
        f.entries[i].peer = n(9);
        f.entries[i].version += 5;
        f.sign_entry(i, &k(9));
        check(&f, "bad_grant");
        // 2. A grant from 1 to 9, signed by 9.
        let mut f = honest.clone();
        f.relink(i, &k(9), n(9), LinkKind::Grant, None);
        check(&f, "bad_signature");
        // 3. A free-count update of 1's entry, signed by 9 (owner unchanged).
        let mut f = honest.clone();
        f.entries[i].free = 0;
        f.entries[i].version += 1;
        f.sign_entry(i, &k(9));
        check(&f, "bad_signature");
        // 4. A split inside 1's piece (the one 1 cut at s+110 when it gave), cut by 9.
        let mut f = honest.clone();
        let (parent, at) = (t + 110, t + 120);
        let origin = Origin::Split { parent, creator: n(9), sig: k(9).sign(DOMAIN_SPLIT, &f.split_bytes(at, parent)) };
        let j = f.entries.partition_point(|e| e.token < at);
        f.entries.insert(j, Entry { token: at, peer: n(9), version: 0, free: 0, origin, links: Vec::new(), sig: None });
        f.sign_entry(j, &k(9));
        check(&f, "bad_grant");
        // 5. A version signed by a name with no bound key.
        let mut f = honest.clone();
        f.relink(i, &k(42), n(42), LinkKind::Takeover, None);
        check(&f, "unknown_key");
        // 6. An unsigned entry that is not the seed ring's.
        let mut f = honest.clone();
        f.entries[i].version += 1;
        f.entries[i].sig = None;
        check(&f, "bad_grant");
    }

    /// A former owner cannot roll a piece back by signing a higher version
    /// that leaves out the grant it made.
    #[test]
    fn rewriting_history_is_refused() {
        let seed = Ring::from_seeds(range(), &[n(1), n(9)]);
        let (s, _) = seed.owned(n(9))[0];
        let mut given = seed.clone();
        given.give(&k(9), n(9), n(2), s, s + 16).expect("give");
        // 9's other future: it never gave, and bumps the version past the grant's.
        let mut rolled = seed.clone();
        rolled.split(s + 16, n(9), &k(9));
        for _ in 0..3 {
            let free = rolled.entry_at(s as u32).map_or(0, |e| e.free);
            rolled.set_free(&k(9), n(9), s as u32, free.saturating_sub(1));
        }
        for me in [1, 3] {
            let mut r = given.clone();
            assert_eq!(reason(merge(&mut r, &rolled, me)), "forked");
            assert_eq!(r, given);
        }
    }

    /// rmpeer: a takeover of a peer the receiver still reaches is refused; once
    /// that peer is unreachable, the same ring merges.
    #[test]
    fn takeover_only_of_unreachable_peers() {
        let seed = Ring::from_seeds(range(), &[n(1), n(2), n(3)]);
        let mut taken = seed.clone();
        assert!(taken.take_over(&k(2), n(2), n(1)).expect("take") > 0);
        let mut r = seed.clone();
        let live = BTreeSet::from([n(1)]);
        assert!(matches!(
            r.merge(&taken, n(3), &keys(), &live),
            Err(RingError::Forged { reason: "takeover_of_reachable", .. })
        ));
        assert_eq!(r, seed);
        assert_eq!(r.merge(&taken, n(3), &keys(), &none()), Ok(true));
        // Once known, later versions do not re-check it.
        let (s, _) = taken.owned(n(2))[0];
        taken.set_free(&k(2), n(2), s as u32, 3);
        assert_eq!(r.merge(&taken, n(3), &keys(), &live), Ok(true));
    }

    /// Rule 7: a piece that changed hands MAX_LINKS times is not given again.
    #[test]
    fn chains_are_bounded() {
        let mut r = Ring::from_seeds(range(), &[n(1), n(2)]);
        let (s, e) = r.owned(n(1))[0];
        for i in 0..MAX_LINKS {
            let (from, to) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
            r.give(&k(from), n(from), n(to), s, e).unwrap_or_else(|e| panic!("give {i}: {e}"));
        }
        let before = r.clone();
        let err = r.give(&k(1), n(1), n(2), s, e).expect_err("bounded");
        assert!(err.contains("changed owner 32 times"), "{err}");
        assert_eq!(r, before);
        let mut fresh = Ring::from_seeds(range(), &[n(1), n(2)]);
        assert_eq!(merge(&mut fresh, &r, 3), Ok(true));
    }
}
