//! Who a peer is: its Ed25519 identity key, the binding of its name to that key, and the
//! signatures that let every router check that a gossip entry was written by the peer it
//! names.
//!
//! A name is bound to a key in one of two ways ([`Trust`]):
//! - **first use** (the default): the first key proven for a name is pinned, kept by the shell
//!   in the state directory and gossiped as a self-signed [`Claim`]; a later claim of the same
//!   name with another key is refused everywhere that saw the first;
//! - **a mesh CA**: only names certified by the CA's key (a [`Certificate`] with an expiry)
//!   are accepted, and a [`Revocation`] signed by the CA ends a key's membership.
//!
//! Every signature covers a domain label (so a signature made for one purpose never verifies
//! for another) and a postcard encoding of the signed fields.

use std::collections::BTreeMap;
use std::fmt;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::PeerName;

/// Domain label of a topology entry's signature.
pub const DOMAIN_TOPOLOGY: &[u8] = b"weft topology v1";
/// Domain label of the signature that binds a key to one control connection.
pub const DOMAIN_BINDING: &[u8] = b"weft connection binding v1";
/// Domain label of a self-signed name claim.
pub const DOMAIN_CLAIM: &[u8] = b"weft name claim v1";
/// Domain label of a CA certificate.
pub const DOMAIN_CERTIFICATE: &[u8] = b"weft certificate v1";
/// Domain label of a CA revocation.
pub const DOMAIN_REVOCATION: &[u8] = b"weft revocation v1";
/// Domain label of a unicast message's signature.
pub const DOMAIN_UNICAST: &[u8] = b"weft unicast v1";
/// Domain label of a deliberate re-key (the old key hands the name to a new one).
pub const DOMAIN_REKEY: &[u8] = b"weft rekey v1";
/// Most names a router keeps keys for (the same bound as the topology's peers).
pub const MAX_KEYS: usize = crate::topology::MAX_PEERS;
/// Most revocations a router keeps.
pub const MAX_REVOCATIONS: usize = 4096;

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Whether `sig` is this key's signature of `msg` under `domain`.
    pub fn verify(&self, domain: &[u8], msg: &[u8], sig: &Signature) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(&framed(domain, msg), &sig.0).is_ok()
    }
}

impl fmt::Display for PublicKey {
    /// Written as 64 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        unhex(s, 64)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(PublicKey)
            .ok_or_else(|| format!("{s:?} is not a public key (64 hex digits)"))
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The bytes of a hex string of at most `max_digits` digits; `None` unless it is all pairs of
/// hex digits.
fn unhex(s: &str, max_digits: usize) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                <[u8; 64]>::try_from(v).map(Signature).map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Signature, E> {
                self.visit_bytes(v)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Signature, E> {
                self.visit_bytes(&v)
            }
            // Self-describing formats without a bytes type (JSON, in the state files) write
            // bytes as a list of numbers.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut b = [0u8; 64];
                for (i, slot) in b.iter_mut().enumerate() {
                    *slot = seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(65, &self));
                }
                Ok(Signature(b))
            }
        }
        d.deserialize_bytes(V)
    }
}

fn framed(domain: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// The postcard bytes of `v`, the form every signature covers.
pub fn signed_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// A private Ed25519 key. Cheap to clone (shared); signing is deterministic.
#[derive(Clone)]
pub struct SigningKey {
    pair: std::sync::Arc<Ed25519KeyPair>,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public)
    }
}

impl SigningKey {
    /// The key made from a 32-byte seed (the private key's stored form).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|e| format!("bad Ed25519 seed: {e}"))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(SigningKey { pair: std::sync::Arc::new(pair), public: PublicKey(public) })
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Signs `msg` under `domain`.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> Signature {
        let sig = self.pair.sign(&framed(domain, msg));
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        Signature(out)
    }
}

/// A CA's statement that `key` may use the name `name` until `expires`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The certified name.
    pub name: PeerName,
    /// The key it is bound to.
    pub key: PublicKey,
    /// Seconds since the Unix epoch after which the certificate is void.
    pub expires: u64,
    /// The CA's key.
    pub ca: PublicKey,
    /// The CA's signature of `(name, key, expires, ca)`.
    pub sig: Signature,
}

impl Certificate {
    /// Signs a certificate with the CA key.
    pub fn issue(ca: &SigningKey, name: PeerName, key: PublicKey, expires: u64) -> Certificate {
        let sig = ca.sign(DOMAIN_CERTIFICATE, &signed_bytes(&(name, key, expires, ca.public())));
        Certificate { name, key, expires, ca: ca.public(), sig }
    }

    /// Whether the CA `ca` signed it and it is valid at `now_unix`.
    pub fn check(&self, ca: &PublicKey, now_unix: u64) -> Result<(), Refused> {
        if self.ca != *ca {
            return Err(Refused::WrongCa { name: self.name });
        }
        if !ca.verify(DOMAIN_CERTIFICATE, &signed_bytes(&(self.name, self.key, self.expires, self.ca)), &self.sig) {
            return Err(Refused::BadSignature { name: self.name, what: "certificate" });
        }
        if now_unix > self.expires {
            return Err(Refused::Expired { name: self.name, expires: self.expires });
        }
        Ok(())
    }
}

/// A value in the one-line text form files and the API use: `PREFIX:` then the hex of its
/// postcard encoding.
pub fn to_text<T: Serialize>(prefix: &str, v: &T) -> String {
    format!("{prefix}:{}", hex(&signed_bytes(v)))
}

/// Reads [`to_text`]'s form back.
pub fn from_text<T: serde::de::DeserializeOwned>(prefix: &str, text: &str) -> Result<T, String> {
    let text = text.trim();
    let digits = text
        .strip_prefix(prefix)
        .and_then(|t| t.strip_prefix(':'))
        .ok_or_else(|| format!("not a {prefix} (it must start with \"{prefix}:\")"))?;
    let bytes = unhex(digits, 8192).ok_or_else(|| format!("the {prefix} is damaged (bad hex)"))?;
    postcard::from_bytes(&bytes).map_err(|e| format!("the {prefix} is damaged: {e}"))
}

/// The text prefix of a certificate.
pub const CERT_PREFIX: &str = "weft-cert-v1";
/// The text prefix of a revocation.
pub const REVOCATION_PREFIX: &str = "weft-revocation-v1";

/// The CA's statement that a key no longer belongs to the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The name the key was certified for.
    pub name: PeerName,
    /// The revoked key.
    pub key: PublicKey,
    /// The CA's signature of `(name, key)`.
    pub sig: Signature,
}

impl Revocation {
    /// Signs a revocation with the CA key.
    pub fn issue(ca: &SigningKey, name: PeerName, key: PublicKey) -> Revocation {
        Revocation { name, key, sig: ca.sign(DOMAIN_REVOCATION, &signed_bytes(&(name, key))) }
    }

    fn check(&self, ca: &PublicKey) -> bool {
        ca.verify(DOMAIN_REVOCATION, &signed_bytes(&(self.name, self.key)), &self.sig)
    }
}

/// What proves that a key may use a name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proof {
    /// The key's own signature of `(name, key)`: trusted on first use.
    SelfSigned(Signature),
    /// A certificate from the mesh CA.
    Certified(Certificate),
}

/// A name bound to a key, as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The name.
    pub name: PeerName,
    /// The key.
    pub key: PublicKey,
    /// Why it may.
    pub proof: Proof,
}

impl Claim {
    /// A self-signed claim of `name` by `key`.
    pub fn self_signed(key: &SigningKey, name: PeerName) -> Claim {
        let sig = key.sign(DOMAIN_CLAIM, &signed_bytes(&(name, key.public())));
        Claim { name, key: key.public(), proof: Proof::SelfSigned(sig) }
    }

    /// A claim carrying a certificate.
    pub fn certified(cert: Certificate) -> Claim {
        Claim { name: cert.name, key: cert.key, proof: Proof::Certified(cert) }
    }
}

/// A deliberate change of a name's key, signed by the old key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rekey {
    /// The name.
    pub name: PeerName,
    /// The key it had.
    pub old: PublicKey,
    /// The key it has from now on.
    pub new: PublicKey,
    /// The old key's signature of `(name, old, new)`.
    pub sig: Signature,
}

impl Rekey {
    /// `old` hands `name` to `new`.
    pub fn issue(old: &SigningKey, name: PeerName, new: PublicKey) -> Rekey {
        let sig = old.sign(DOMAIN_REKEY, &signed_bytes(&(name, old.public(), new)));
        Rekey { name, old: old.public(), new, sig }
    }
}

/// How names are bound to keys in this mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The first key proven for a name is pinned.
    FirstUse,
    /// Only names certified by this CA key.
    Ca(PublicKey),
}

/// Why a claim, a connection or an entry was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The name is bound to another key.
    #[error("{name} is bound to key {pinned}, but this claim uses key {offered}: refused (if the host was re-keyed on purpose, run `weft identity forget {name}` on this host)")]
    Impostor {
        /// The name.
        name: PeerName,
        /// The key bound to it.
        pinned: PublicKey,
        /// The key offered.
        offered: PublicKey,
    },
    /// A signature did not verify.
    #[error("{what} of {name} carries a bad signature")]
    BadSignature {
        /// Whose.
        name: PeerName,
        /// What was signed.
        what: &'static str,
    },
    /// No key is known for the name yet.
    #[error("no key is known for {name} yet")]
    UnknownKey {
        /// The name.
        name: PeerName,
    },
    /// The mesh uses a CA and the claim has no certificate from it.
    #[error("{name} has no certificate from this mesh's CA")]
    WrongCa {
        /// The name.
        name: PeerName,
    },
    /// The certificate expired.
    #[error("the certificate of {name} expired at {expires} (Unix time): renew it with `weft ca sign`")]
    Expired {
        /// The name.
        name: PeerName,
        /// When.
        expires: u64,
    },
    /// The CA revoked the key.
    #[error("the key of {name} was revoked by the mesh CA")]
    Revoked {
        /// The name.
        name: PeerName,
    },
    /// Too many names.
    #[error("more than {MAX_KEYS} names")]
    Full,
}

impl Refused {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Impostor { .. } => "impostor",
            Refused::BadSignature { .. } => "bad_signature",
            Refused::UnknownKey { .. } => "unknown_key",
            Refused::WrongCa { .. } => "no_certificate",
            Refused::Expired { .. } => "expired",
            Refused::Revoked { .. } => "revoked",
            Refused::Full => "full",
        }
    }

    /// Every label, for metrics.
    pub const LABELS: [&'static str; 7] =
        ["impostor", "bad_signature", "unknown_key", "no_certificate", "expired", "revoked", "full"];
}

/// What [`Keys::admit`] did with a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The name was already bound to this key.
    Known,
    /// The name is now bound to this key (first use, or a certificate).
    New,
}

/// The names this router knows keys for, with the claims that prove them, and the CA's
/// revocations. The one place that decides whether a key may speak for a name.
#[derive(Clone, Debug)]
pub struct Keys {
    trust: Trust,
    claims: BTreeMap<PeerName, Claim>,
    revoked: BTreeMap<PublicKey, Revocation>,
    now_unix: u64,
}

impl Keys {
    /// An empty set under `trust`.
    pub fn new(trust: Trust) -> Self {
        Keys { trust, claims: BTreeMap::new(), revoked: BTreeMap::new(), now_unix: 0 }
    }

    /// The trust mode.
    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// Sets the wall clock (seconds since the Unix epoch) that certificates are checked
    /// against. Returns the names whose certificates expired since the last call.
    pub fn set_now(&mut self, now_unix: u64) -> Vec<PeerName> {
        self.now_unix = now_unix;
        let Trust::Ca(_) = self.trust else { return Vec::new() };
        let expired: Vec<PeerName> = self
            .claims
            .values()
            .filter(|c| matches!(&c.proof, Proof::Certified(cert) if cert.expires < now_unix))
            .map(|c| c.name)
            .collect();
        for n in &expired {
            self.claims.remove(n);
        }
        expired
    }

    /// The key bound to `name`.
    pub fn get(&self, name: PeerName) -> Option<PublicKey> {
        self.claims.get(&name).map(|c| c.key)
    }

    /// Every claim, ordered by name.
    pub fn claims(&self) -> impl Iterator<Item = &Claim> {
        self.claims.values()
    }

    /// Every revocation.
    pub fn revocations(&self) -> impl Iterator<Item = &Revocation> {
        self.revoked.values()
    }

    /// Number of bound names.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether no name is bound.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Checks a claim and, if it holds, binds its name. A name already bound to another key
    /// stays bound: the claim is refused as an impostor.
    pub fn admit(&mut self, claim: &Claim) -> Result<Admitted, Refused> {
        let name = claim.name;
        if self.revoked.contains_key(&claim.key) {
            return Err(Refused::Revoked { name });
        }
        match (&self.trust, &claim.proof) {
            (Trust::FirstUse, Proof::SelfSigned(sig)) => {
                if !claim.key.verify(DOMAIN_CLAIM, &signed_bytes(&(name, claim.key)), sig) {
                    return Err(Refused::BadSignature { name, what: "name claim" });
                }
            }
            // A certificate also proves possession for first use: the CA vouched for the key.
            (Trust::FirstUse, Proof::Certified(cert)) => {
                if cert.name != name || cert.key != claim.key {
                    return Err(Refused::BadSignature { name, what: "certificate" });
                }
                cert.check(&cert.ca, self.now_unix)?;
            }
            (Trust::Ca(ca), Proof::Certified(cert)) => {
                if cert.name != name || cert.key != claim.key {
                    return Err(Refused::BadSignature { name, what: "certificate" });
                }
                cert.check(ca, self.now_unix)?;
            }
            (Trust::Ca(_), Proof::SelfSigned(_)) => return Err(Refused::WrongCa { name }),
        }
        match self.claims.get(&name) {
            Some(old) if old.key == claim.key => {
                // A newer certificate for the same key replaces an older one.
                if let (Proof::Certified(new), Proof::Certified(have)) = (&claim.proof, &old.proof) {
                    if new.expires > have.expires {
                        self.claims.insert(name, claim.clone());
                    }
                }
                Ok(Admitted::Known)
            }
            Some(old) => {
                // Under a CA, a valid certificate for a new key replaces one whose key the CA
                // revoked (handled above) or that expired (removed by set_now); otherwise
                // the name keeps its key.
                Err(Refused::Impostor { name, pinned: old.key, offered: claim.key })
            }
            None => {
                if self.claims.len() >= MAX_KEYS {
                    return Err(Refused::Full);
                }
                self.claims.insert(name, claim.clone());
                Ok(Admitted::New)
            }
        }
    }

    /// Applies a deliberate re-key signed by the name's current key. Returns whether it changed
    /// anything. Under a CA, re-keying is done by certifying the new key instead.
    pub fn rekey(&mut self, r: &Rekey, new_claim: &Claim) -> Result<bool, Refused> {
        let name = r.name;
        if self.trust != Trust::FirstUse {
            return Err(Refused::WrongCa { name });
        }
        if new_claim.name != name || new_claim.key != r.new {
            return Err(Refused::BadSignature { name, what: "re-key" });
        }
        if !r.old.verify(DOMAIN_REKEY, &signed_bytes(&(name, r.old, r.new)), &r.sig) {
            return Err(Refused::BadSignature { name, what: "re-key" });
        }
        match self.claims.get(&name) {
            Some(c) if c.key == r.new => return Ok(false),
            Some(c) if c.key != r.old => return Err(Refused::Impostor { name, pinned: c.key, offered: r.old }),
            _ => {}
        }
        if let Proof::SelfSigned(sig) = &new_claim.proof {
            if !r.new.verify(DOMAIN_CLAIM, &signed_bytes(&(name, r.new)), sig) {
                return Err(Refused::BadSignature { name, what: "name claim" });
            }
        }
        self.claims.insert(name, new_claim.clone());
        Ok(true)
    }

    /// Unbinds a name (an operator's decision on this host, e.g. after re-installing a host
    /// that lost its key). Returns the claim that was removed.
    pub fn forget(&mut self, name: PeerName) -> Option<Claim> {
        self.claims.remove(&name)
    }

    /// Applies a revocation signed by the mesh CA. Returns `None` when it was already known,
    /// else `Some` of the name whose binding it ended (`Some(None)`: it names no bound key).
    pub fn revoke(&mut self, r: &Revocation) -> Result<Option<Option<PeerName>>, Refused> {
        let Trust::Ca(ca) = self.trust else { return Err(Refused::WrongCa { name: r.name }) };
        if !r.check(&ca) {
            return Err(Refused::BadSignature { name: r.name, what: "revocation" });
        }
        if self.revoked.contains_key(&r.key) {
            return Ok(None);
        }
        if self.revoked.len() >= MAX_REVOCATIONS {
            return Err(Refused::Full);
        }
        self.revoked.insert(r.key, r.clone());
        match self.claims.get(&r.name) {
            Some(c) if c.key == r.key => {
                self.claims.remove(&r.name);
                Ok(Some(Some(r.name)))
            }
            _ => Ok(Some(None)),
        }
    }

    /// Checks that `sig` is `name`'s signature of `msg` under `domain`.
    pub fn verify(&self, name: PeerName, domain: &[u8], msg: &[u8], sig: &Signature, what: &'static str) -> Result<(), Refused> {
        let key = self.get(name).ok_or(Refused::UnknownKey { name })?;
        if key.verify(domain, msg, sig) {
            Ok(())
        } else {
            Err(Refused::BadSignature { name, what })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed(&[n; 32]).expect("seed")
    }

    #[test]
    fn signatures_verify_only_for_their_key_domain_and_message() {
        let k = key(1);
        let s = k.sign(DOMAIN_TOPOLOGY, b"hello");
        assert!(k.public().verify(DOMAIN_TOPOLOGY, b"hello", &s));
        assert!(!k.public().verify(DOMAIN_TOPOLOGY, b"hellO", &s));
        assert!(!k.public().verify(DOMAIN_UNICAST, b"hello", &s));
        assert!(!key(2).public().verify(DOMAIN_TOPOLOGY, b"hello", &s));
        let bytes = postcard::to_stdvec(&s).expect("encode");
        assert_eq!(postcard::from_bytes::<Signature>(&bytes).expect("decode"), s);
        assert!(postcard::from_bytes::<Signature>(&bytes[..40]).is_err());
        // JSON (the state files) writes the bytes as a list and must read it back.
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<Signature>(&json).expect("from json"), s);
        assert!(serde_json::from_str::<Signature>("[1,2,3]").is_err());
        let long = format!("[{}]", vec!["7"; 65].join(","));
        assert!(serde_json::from_str::<Signature>(&long).is_err());
        let text = k.public().to_string();
        assert_eq!(text.parse::<PublicKey>().expect("parse"), k.public());
        assert!("zz".parse::<PublicKey>().is_err());
    }

    #[test]
    fn first_use_pins_and_refuses_another_key() {
        let name = PeerName::from_u64(7);
        let mut keys = Keys::new(Trust::FirstUse);
        assert_eq!(keys.admit(&Claim::self_signed(&key(1), name)), Ok(Admitted::New));
        assert_eq!(keys.admit(&Claim::self_signed(&key(1), name)), Ok(Admitted::Known));
        let err = keys.admit(&Claim::self_signed(&key(2), name)).expect_err("impostor");
        assert_eq!(err, Refused::Impostor { name, pinned: key(1).public(), offered: key(2).public() });
        assert_eq!(keys.get(name), Some(key(1).public()));
        // A claim whose signature is not the key's own.
        let mut forged = Claim::self_signed(&key(3), PeerName::from_u64(8));
        forged.key = key(4).public();
        assert!(matches!(keys.admit(&forged), Err(Refused::BadSignature { .. })));
        assert_eq!(keys.get(PeerName::from_u64(8)), None);
    }

    #[test]
    fn rekey_needs_the_old_key() {
        let name = PeerName::from_u64(7);
        let mut keys = Keys::new(Trust::FirstUse);
        keys.admit(&Claim::self_signed(&key(1), name)).expect("admit");
        // An attacker's re-key, signed by its own key, is refused.
        let bad = Rekey::issue(&key(9), name, key(9).public());
        assert!(keys.rekey(&bad, &Claim::self_signed(&key(9), name)).is_err());
        let good = Rekey::issue(&key(1), name, key(2).public());
        assert_eq!(keys.rekey(&good, &Claim::self_signed(&key(2), name)), Ok(true));
        assert_eq!(keys.get(name), Some(key(2).public()));
        assert_eq!(keys.rekey(&good, &Claim::self_signed(&key(2), name)), Ok(false));
    }

    #[test]
    fn ca_certifies_expires_and_revokes() {
        let ca = key(100);
        let name = PeerName::from_u64(7);
        let mut keys = Keys::new(Trust::Ca(ca.public()));
        keys.set_now(1000);
        assert!(matches!(keys.admit(&Claim::self_signed(&key(1), name)), Err(Refused::WrongCa { .. })));
        let rogue_ca = key(101);
        let rogue = Claim::certified(Certificate::issue(&rogue_ca, name, key(1).public(), 2000));
        assert!(matches!(keys.admit(&rogue), Err(Refused::WrongCa { .. })));
        let expired = Claim::certified(Certificate::issue(&ca, name, key(1).public(), 999));
        assert!(matches!(keys.admit(&expired), Err(Refused::Expired { .. })));
        let mut tampered = Certificate::issue(&ca, name, key(1).public(), 2000);
        tampered.expires = u64::MAX;
        assert!(matches!(keys.admit(&Claim::certified(tampered)), Err(Refused::BadSignature { .. })));
        let good = Claim::certified(Certificate::issue(&ca, name, key(1).public(), 2000));
        assert_eq!(keys.admit(&good), Ok(Admitted::New));
        // Expiry removes the binding.
        assert_eq!(keys.set_now(2001), vec![name]);
        assert_eq!(keys.get(name), None);
        keys.set_now(1500);
        keys.admit(&good).expect("again");
        // A revocation by another key is refused; the CA's ends the binding for good.
        assert!(keys.revoke(&Revocation::issue(&rogue_ca, name, key(1).public())).is_err());
        assert_eq!(keys.revoke(&Revocation::issue(&ca, name, key(1).public())), Ok(Some(Some(name))));
        assert_eq!(keys.revoke(&Revocation::issue(&ca, name, key(1).public())), Ok(None), "known");
        assert_eq!(keys.get(name), None);
        assert!(matches!(keys.admit(&good), Err(Refused::Revoked { .. })));
    }

    #[test]
    fn certificates_and_revocations_round_trip_as_text() {
        let ca = key(100);
        let cert = Certificate::issue(&ca, PeerName::from_u64(7), key(1).public(), 2000);
        let text = to_text(CERT_PREFIX, &cert);
        assert_eq!(from_text::<Certificate>(CERT_PREFIX, &format!("{text}\n")), Ok(cert));
        assert!(from_text::<Certificate>(REVOCATION_PREFIX, &text).is_err());
        assert!(from_text::<Certificate>(CERT_PREFIX, &text[..text.len() - 2]).is_err());
        assert!(from_text::<Certificate>(CERT_PREFIX, "weft-cert-v1:zz").is_err());
    }

    /// The cost of checking gossip: `cargo test --release -p weft-proto -- --ignored --nocapture
    /// verification_rate`. Not a pass/fail test; figures go to docs/benchmarks.md.
    #[test]
    #[ignore]
    fn verification_rate() {
        let k = key(1);
        let mut keys = Keys::new(Trust::FirstUse);
        keys.admit(&Claim::self_signed(&k, PeerName::from_u64(1))).expect("admit");
        let msg = vec![7u8; 300];
        let sig = k.sign(DOMAIN_TOPOLOGY, &msg);
        let n = 20_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert!(keys.verify(PeerName::from_u64(1), DOMAIN_TOPOLOGY, &msg, &sig, "x").is_ok());
        }
        let verify = n as f64 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(k.sign(DOMAIN_TOPOLOGY, &msg));
        }
        let sign = n as f64 / t.elapsed().as_secs_f64();
        eprintln!("Ed25519 over 300-byte entries, one core: {verify:.0} verifications/s, {sign:.0} signatures/s");
    }

    #[test]
    fn verify_checks_the_bound_key() {
        let name = PeerName::from_u64(7);
        let mut keys = Keys::new(Trust::FirstUse);
        let s = key(1).sign(DOMAIN_UNICAST, b"m");
        assert!(matches!(keys.verify(name, DOMAIN_UNICAST, b"m", &s, "x"), Err(Refused::UnknownKey { .. })));
        keys.admit(&Claim::self_signed(&key(1), name)).expect("admit");
        assert!(keys.verify(name, DOMAIN_UNICAST, b"m", &s, "x").is_ok());
        let s2 = key(2).sign(DOMAIN_UNICAST, b"m");
        assert!(matches!(keys.verify(name, DOMAIN_UNICAST, b"m", &s2, "x"), Err(Refused::BadSignature { .. })));
    }
}
