//! What checking signed IPAM gossip costs: raw Ed25519 signs and verifies per
//! second, a first merge of a ring where every entry is new (every signature
//! checked), and a merge where one entry changed (one checked).
//!
//! `cargo run --release -p weft-ipam --example verify_cost`

// A measuring program: its figures are its output.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::time::Instant;

use weft_ipam::{Cidr, Ring};
use weft_proto::identity::Claim;
use weft_proto::{Keys, PeerName, SigningKey, Trust};

fn main() -> Result<(), String> {
    let peers = 100u64;
    let names: Vec<PeerName> = (1..=peers).map(PeerName::from_u64).collect();
    let signing: Vec<SigningKey> = (1..=peers)
        .map(|i| SigningKey::from_seed(&[i as u8; 32]))
        .collect::<Result<_, _>>()?;
    let mut keys = Keys::new(Trust::FirstUse);
    for (n, k) in names.iter().zip(&signing) {
        keys.admit(&Claim::self_signed(k, *n)).map_err(|e| e.to_string())?;
    }

    let n = 20_000;
    let t = Instant::now();
    let sigs: Vec<_> = (0..n).map(|i: u32| signing[0].sign(b"bench", &i.to_le_bytes())).collect();
    let sign_rate = f64::from(n) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ok = sigs.iter().enumerate().filter(|(i, s)| signing[0].public().verify(b"bench", &(*i as u32).to_le_bytes(), s)).count();
    let verify_rate = f64::from(n) / t.elapsed().as_secs_f64();
    assert_eq!(ok, n as usize);
    println!("Ed25519: {sign_rate:.0} signs/s, {verify_rate:.0} verifies/s (one core)");

    // A /12 over 100 seeds; every peer gives 8 pieces of its share to the next peer.
    let range: Cidr = "10.32.0.0/12".parse::<Cidr>().map_err(|e| e.to_string())?;
    let seed = Ring::from_seeds(range, &names);
    let mut ring = seed.clone();
    for (i, me) in names.iter().enumerate() {
        let to = names[(i + 1) % names.len()];
        let (s, e) = seed.owned(*me)[0];
        let step = (e - s) / 16;
        for j in 0..8 {
            let a = s + (2 * j + 1) * step;
            ring.give(&signing[i], *me, to, a, a + step / 2)?;
        }
    }
    let entries = ring.entries().len();
    let sigs_in_ring: usize = ring.entries().iter().map(|e| usize::from(e.sig.is_some()) + e.links.len() + usize::from(e.origin != weft_ipam::ring::Origin::Seed)).sum();
    let bytes = postcard::to_stdvec(&ring).map_err(|e| e.to_string())?.len();
    let none = BTreeSet::new();
    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        let mut fresh = seed.clone();
        fresh.merge(&ring, PeerName::from_u64(10_000), &keys, &none).map_err(|e| e.to_string())?;
    }
    let full = t.elapsed().as_secs_f64() / f64::from(rounds);
    println!(
        "ring of {entries} entries ({sigs_in_ring} signatures, {bytes} bytes): first merge {:.1} ms ({:.0} signatures/s)",
        full * 1e3,
        sigs_in_ring as f64 / full
    );
    let mut known = seed.clone();
    known.merge(&ring, PeerName::from_u64(10_000), &keys, &none).map_err(|e| e.to_string())?;
    let mut changed = ring.clone();
    let p = changed.pieces().find(|p| p.entry.peer == names[0]).map(|p| (p.entry.token, p.entry.free)).ok_or("no piece")?;
    changed.set_free(&signing[0], names[0], p.0, p.1 - 1);
    let t = Instant::now();
    for _ in 0..rounds {
        let mut k = known.clone();
        k.merge(&changed, PeerName::from_u64(10_000), &keys, &none).map_err(|e| e.to_string())?;
    }
    let one = t.elapsed().as_secs_f64() / f64::from(rounds);
    let t = Instant::now();
    for _ in 0..rounds {
        let _ = known.clone();
    }
    let clone = t.elapsed().as_secs_f64() / f64::from(rounds);
    println!("merge of the same ring with one entry changed: {:.2} ms (of which cloning the ring {:.2} ms)", one * 1e3, clone * 1e3);
    Ok(())
}
