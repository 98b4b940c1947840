//! Links to directly connected peers, and how the frame path's threads see the links and routes
//! the control path installs.
//!
//! The control path publishes a new [`Snapshot`] when a connection comes or goes or routes change
//! (rarely); each thread keeps its own `Arc` of the current one and looks for a newer one once
//! per batch with one atomic load. No lock is held while frames are handled or sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_proto::sleeve::{Opener, Sealer};
use weft_proto::{PeerName, Routes};

/// The data path to one directly connected peer.
pub struct Link {
    /// The peer.
    pub peer: PeerName,
    /// Where its sleeve listens.
    pub addr: SocketAddr,
    /// Our receive index for this link.
    pub index: u32,
    /// Whether messages are encrypted.
    pub encrypted: bool,
    /// Seals what we send. Taken by the TAP thread, and by the UDP thread when it relays; held
    /// only while sealing, never while sending.
    pub sealer: Mutex<Sealer>,
    /// Opens what we receive (the UDP thread only).
    pub opener: Mutex<Opener>,
    /// Milliseconds after `epoch` of the last heartbeat received, 0 = never.
    last_heartbeat: AtomicU64,
    epoch: Instant,
}

impl Link {
    /// A new link; `epoch` is the frame path's start.
    pub fn new(peer: PeerName, addr: SocketAddr, index: u32, sealer: Sealer, opener: Opener, epoch: Instant) -> Self {
        Link {
            peer,
            addr,
            index,
            encrypted: sealer.encrypted(),
            sealer: Mutex::new(sealer),
            opener: Mutex::new(opener),
            last_heartbeat: AtomicU64::new(0),
            epoch,
        }
    }

    /// A heartbeat arrived now.
    pub fn heard(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_heartbeat.store(ms.max(1), Relaxed);
    }

    /// Time since the last heartbeat, if any arrived.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        let at = self.last_heartbeat.load(Relaxed);
        (at != 0).then(|| self.epoch.elapsed().saturating_sub(Duration::from_millis(at)))
    }
}

/// Links and routes as the frame path's threads see them.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// Unicast next hops and broadcast trees.
    pub routes: Routes,
    /// Links by peer.
    pub links: HashMap<PeerName, Arc<Link>>,
    /// Links by our receive index (the sleeve header's receiver field).
    pub by_index: HashMap<u32, Arc<Link>>,
}

/// A value one writer replaces now and then and readers on other threads pick up without
/// taking a lock on their hot path.
pub struct Published<T> {
    current: Mutex<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Published<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Published { current: Mutex::new(Arc::new(value)), generation: AtomicU64::new(1) }
    }

    /// Replaces the value with `f` of the current one.
    pub fn update(&self, f: impl FnOnce(&T) -> T) {
        let mut cur = lock(&self.current);
        *cur = Arc::new(f(&cur));
        self.generation.fetch_add(1, Release);
    }

    /// The current value (takes the lock briefly: for the control path, not per frame).
    pub fn load(&self) -> Arc<T> {
        lock(&self.current).clone()
    }

    /// A reader for one thread.
    pub fn reader(&self) -> Reader<T> {
        let generation = self.generation.load(Acquire);
        Reader { value: self.load(), generation }
    }
}

/// One thread's view of a [`Published`] value.
pub struct Reader<T> {
    value: Arc<T>,
    generation: u64,
}

impl<T> Reader<T> {
    /// Picks up a newer value if there is one; returns whether it did. One atomic load when
    /// nothing changed.
    pub fn refresh(&mut self, p: &Published<T>) -> bool {
        let g = p.generation.load(Acquire);
        if g == self.generation {
            return false;
        }
        self.value = p.load();
        self.generation = g;
        true
    }

    /// The value as of the last refresh.
    pub fn get(&self) -> &Arc<T> {
        &self.value
    }
}

/// Sleeve receive indices: a counter from a random start, unique for 2^32 links.
#[derive(Clone)]
pub struct Indices(Arc<AtomicU64>);

impl Indices {
    /// From a random start.
    pub fn new() -> Self {
        Indices(Arc::new(AtomicU64::new(u64::from(rand::random::<u32>() | 1))))
    }

    /// The next index.
    pub fn next(&self) -> u32 {
        self.0.fetch_add(1, Relaxed) as u32
    }
}

impl Default for Indices {
    fn default() -> Self {
        Self::new()
    }
}

// Poisoning only follows a panic on another thread while it held the lock; every holder
// finishes its update before releasing, so the value is consistent: keep going rather than take
// the router down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_updates_once() {
        let p = Published::new(1u32);
        let mut r = p.reader();
        assert_eq!(**r.get(), 1);
        assert!(!r.refresh(&p));
        p.update(|v| v + 1);
        assert!(r.refresh(&p));
        assert_eq!(**r.get(), 2);
        assert!(!r.refresh(&p));
        let r2 = p.reader();
        assert_eq!(**r2.get(), 2);
    }

    #[test]
    fn heartbeat_age_starts_unknown() {
        let epoch = Instant::now() - Duration::from_secs(5);
        let l = Link::new(
            PeerName::from_u64(1),
            "127.0.0.1:1".parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1))),
            7,
            Sealer::new(weft_proto::sleeve::Cipher::Plain, 1),
            Opener::new(weft_proto::sleeve::Cipher::Plain),
            epoch,
        );
        assert_eq!(l.heartbeat_age(), None);
        l.heard();
        assert!(l.heartbeat_age().is_some_and(|a| a < Duration::from_secs(1)));
    }
}
