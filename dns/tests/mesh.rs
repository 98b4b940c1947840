//! The record store riding on real `weft_proto::Router`s, wired the way the
//! daemon does it (see the crate docs), over an in-memory network: names
//! spread through relays, removals follow, a restarted origin re-asserts its
//! entries, and the entries of a peer that leaves the topology go and come back;
//! a member that forges other origins' entries changes nothing and is counted
//! by the neighbour that got them, which does not pass them on.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use weft_dns::records::{Output, Records};
use weft_dns::{encode_entries, Entry, CHANNEL};
use weft_proto::identity::Claim;
use weft_proto::router::Session;
use weft_proto::{ConnId, Hello, PeerName, Router, RouterConfig, SigningKey};

/// Node `i`'s identity key, the same in each of its lives.
fn key(i: usize) -> SigningKey {
    SigningKey::from_seed(&[i as u8 + 1; 32]).unwrap()
}

struct Node {
    router: Router,
    name: PeerName,
}

struct Net {
    nodes: Vec<Node>,
    /// (node, conn) → (other node, its conn).
    links: BTreeMap<(usize, ConnId), (usize, ConnId)>,
    next_conn: u64,
    t0: Instant,
    now_ms: u64,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
}

impl Net {
    fn new(n: usize) -> Net {
        let mut net = Net {
            nodes: Vec::new(),
            links: BTreeMap::new(),
            next_conn: 1,
            t0: Instant::now(),
            now_ms: 1_000_000,
        };
        for i in 0..n {
            net.nodes.push(net.node(i, 1));
        }
        net
    }

    /// A (re)started node `i`; `life` changes its UID and start time.
    fn node(&self, i: usize, life: u64) -> Node {
        let name = PeerName::from_u64(i as u64 + 1);
        let start_us = self.now_ms * 1000 + life;
        let mut cfg = RouterConfig::new(name, format!("n{i}"), life * 1000 + i as u64, i as u64, key(i));
        cfg.initial_version = start_us;
        let mut router = Router::new(cfg, self.t0);
        router.register_channel(CHANNEL, Box::new(Records::new(name, start_us, key(i))));
        Node { router, name }
    }

    fn records(&mut self, i: usize) -> &mut Records {
        self.nodes[i]
            .router
            .channel_mut::<Records>(CHANNEL)
            .unwrap()
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms - 1_000_000)
    }

    fn connect(&mut self, a: usize, b: usize) {
        let (ca, cb) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
        self.next_conn += 2;
        let now = self.now();
        let binding = [ca.0 as u8; 32];
        let hello = |n: &Node, i: usize| {
            Hello::prove(&key(i), Claim::self_signed(&key(i), n.name), format!("n{i}"), 0, addr(i).port(), &binding)
        };
        let (ha, hb) = (hello(&self.nodes[a], a), hello(&self.nodes[b], b));
        self.nodes[a]
            .router
            .handle_connection_up(now, ca, addr(b), Some(addr(b)), hb, Session { local: addr(a), binding })
            .unwrap();
        self.nodes[b]
            .router
            .handle_connection_up(now, cb, addr(a), None, ha, Session { local: addr(b), binding })
            .unwrap();
        self.links.insert((a, ca), (b, cb));
        self.links.insert((b, cb), (a, ca));
        self.pump();
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        let now = self.now();
        let conns: Vec<((usize, ConnId), (usize, ConnId))> = self
            .links
            .iter()
            .filter(|((x, _), (y, _))| *x == a && *y == b)
            .map(|(k, v)| (*k, *v))
            .collect();
        for (ka, kb) in conns {
            self.links.remove(&ka);
            self.links.remove(&kb);
            self.nodes[ka.0]
                .router
                .handle_connection_down(now, ka.1, "test");
            self.nodes[kb.0]
                .router
                .handle_connection_down(now, kb.1, "test");
        }
        self.pump();
    }

    /// What the daemon does after every router input: drain the channel's
    /// outputs into the router, keep the store in line with the topology,
    /// then deliver the router's transmits. Until quiet.
    fn pump(&mut self) {
        let now = self.now();
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                self.shell_tick(i);
                while let Some(t) = self.nodes[i].router.poll_transmit() {
                    moved = true;
                    let Some(&(j, cj)) = self.links.get(&(i, t.conn)) else {
                        continue;
                    };
                    if let Err(e) = self.nodes[j].router.handle_message(now, cj, t.msg) {
                        panic!("node {j} refused a message from node {i}: {e}");
                    }
                }
                while self.nodes[i].router.poll_event().is_some() {}
            }
            if !moved {
                return;
            }
        }
        panic!("gossip did not settle");
    }

    fn shell_tick(&mut self, i: usize) {
        let now_ms = self.now_ms;
        let node = &mut self.nodes[i];
        let live: Vec<PeerName> = node.router.topology().peers().map(|p| p.name).collect();
        let Some(r) = node.router.channel_mut::<Records>(CHANNEL) else {
            return;
        };
        r.sync_origins(now_ms, |p| live.contains(&p));
        let mut outs = Vec::new();
        while let Some(o) = r.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Output::Broadcast(d) => node.router.broadcast(CHANNEL, d),
                Output::Unicast(to, d) => {
                    node.router.send_unicast(to, CHANNEL, d);
                }
            }
        }
    }

    fn add(&mut self, i: usize, id: &str, name: &str, a: &str) {
        if let Some(d) = self.records(i).add(id, name, a.parse().unwrap()).unwrap() {
            self.nodes[i].router.broadcast(CHANNEL, d);
        }
        self.pump();
    }

    fn remove(&mut self, i: usize, id: &str) {
        let now_ms = self.now_ms;
        if let Some(d) = self.records(i).remove_container(now_ms, id) {
            self.nodes[i].router.broadcast(CHANNEL, d);
        }
        self.pump();
    }

    fn lookup(&mut self, i: usize, name: &str) -> Vec<IpAddr> {
        self.records(i).view().lookup(name)
    }
}

fn ips(s: &[&str]) -> Vec<IpAddr> {
    s.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn names_spread_through_relays_and_removals_follow() {
    let mut net = Net::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.add(0, "c1", "web", "10.32.0.1");
    net.add(2, "c2", "web", "10.32.0.2");
    net.add(2, "c3", "db", "10.32.0.3");
    for i in 0..3 {
        assert_eq!(
            net.lookup(i, "web"),
            ips(&["10.32.0.1", "10.32.0.2"]),
            "node {i}"
        );
        assert_eq!(net.lookup(i, "db"), ips(&["10.32.0.3"]), "node {i}");
    }
    net.remove(2, "c2");
    for i in 0..3 {
        assert_eq!(net.lookup(i, "web"), ips(&["10.32.0.1"]), "node {i}");
    }
    // A node that joins later gets everything with its first full state.
    net.nodes.push(net.node(3, 1));
    net.connect(3, 0);
    assert_eq!(net.lookup(3, "db"), ips(&["10.32.0.3"]));
    assert_eq!(net.records(3).counts().tombstones, 1);
}

#[test]
fn a_restarted_origin_reasserts_its_entries() {
    let mut net = Net::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.add(0, "kept", "web", "10.32.0.1");
    net.add(0, "vanished", "old", "10.32.0.2");
    assert_eq!(net.lookup(2, "old").len(), 1);

    // Node 0 restarts; while it was down its container "vanished" went. It
    // re-adds what it still has (the daemon does this from its saved state).
    net.disconnect(0, 1);
    net.now_ms += 5_000;
    net.nodes[0] = net.node(0, 2);
    let saved = [("kept", "web", "10.32.0.1")];
    for (id, name, a) in saved {
        net.records(0).add(id, name, a.parse().unwrap()).unwrap();
    }
    net.connect(0, 1);
    for i in 0..3 {
        assert_eq!(net.lookup(i, "web"), ips(&["10.32.0.1"]), "node {i}");
        assert!(
            net.lookup(i, "old").is_empty(),
            "node {i}: the vanished container's name is gone"
        );
    }
}

#[test]
fn names_of_a_peer_that_leaves_go_and_come_back() {
    let mut net = Net::new(3);
    net.connect(0, 1);
    net.connect(1, 2);
    net.add(2, "c", "api", "10.32.0.9");
    assert_eq!(net.lookup(0, "api").len(), 1);
    net.disconnect(1, 2);
    assert!(
        net.lookup(0, "api").is_empty(),
        "node 2 is gone from the topology"
    );
    assert!(net.lookup(1, "api").is_empty());
    assert_eq!(net.lookup(2, "api").len(), 1, "its own names stay");
    net.connect(2, 1);
    assert_eq!(net.lookup(0, "api").len(), 1, "back with the peer");
    assert_eq!(net.lookup(1, "api").len(), 1);
}

#[test]
fn forged_entries_stop_at_the_first_honest_peer() {
    // 0 - 1 - 2, and 3, a member with the password and its own key, next to 1.
    let mut net = Net::new(4);
    net.connect(0, 1);
    net.connect(1, 2);
    net.connect(3, 1);
    net.add(0, "c1", "web", "10.32.0.1");
    let held = net.records(2).entries();
    let web = held.iter().find(|e| e.name == "web").unwrap().clone();
    // Node 3 writes entries in node 0's name, signed with its own key: a new
    // name, a tombstone of the live one, and the live one at the top version.
    let forged = vec![
        Entry { id: "evil".into(), name: "evil".into(), addr: "10.6.6.6".parse().unwrap(), ..web.clone() },
        Entry { version: web.version + 1, deleted_ms: Some(1), ..web.clone() },
        Entry { version: u64::MAX, addr: "10.6.6.6".parse().unwrap(), ..web.clone() },
    ];
    let payload = encode_entries(forged.into_iter().map(|e| e.sign(&key(3))).collect());
    net.nodes[3].router.broadcast(CHANNEL, payload);
    net.pump();
    for i in 0..3 {
        assert_eq!(net.lookup(i, "web"), ips(&["10.32.0.1"]), "node {i}");
        assert!(net.lookup(i, "evil").is_empty(), "node {i}");
    }
    assert_eq!(net.records(2).entries(), held, "node 2 holds what it held");
    let forger = net.nodes[3].name;
    let r1 = net.records(1).refusals().clone();
    assert_eq!(r1.forged, 3);
    assert_eq!(r1.by_sender.get(&forger).map(|c| c.forged), Some(3), "counted against the sender");
    for i in [0, 2] {
        assert_eq!(net.records(i).refusals().forged, 0, "node {i}: never relayed to it");
    }
    // The honest mesh goes on as before.
    net.add(2, "c2", "db", "10.32.0.2");
    assert_eq!(net.lookup(0, "db"), ips(&["10.32.0.2"]));
}
