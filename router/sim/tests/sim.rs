//! Scenario tests on the simulated network. Each runs over a fixed list of
//! seeds, or only over `WEFT_SIM_SEED` when that is set; a failing run prints
//! its seed.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use weft_sim::{Sim, GOSSIP_INTERVAL};

/// The seeds to run: `WEFT_SIM_SEED` alone if set, else `0..n`.
fn seeds(n: u64) -> Vec<u64> {
    match std::env::var("WEFT_SIM_SEED") {
        Ok(s) => vec![s.trim().parse().expect("WEFT_SIM_SEED must be a u64")],
        Err(_) => (0..n).collect(),
    }
}

/// Prints the seed if the scenario panics while this is alive.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failed with seed={} (rerun with WEFT_SIM_SEED={})", self.0, self.0);
        }
    }
}

/// Peers in the many-seed scenarios: `WEFT_SIM_PEERS`, default 20. Each
/// scenario also runs once at 50 peers (`fifty_*`): a 50-peer full-mesh join
/// is about 450 000 events and most of a minute of CPU in a release build, so
/// only one seed runs there by default.
fn peers() -> usize {
    std::env::var("WEFT_SIM_PEERS").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(20)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `n` peers joining in random name order at random times over `over`, each
/// given one random earlier peer's address. Returns the sim, the join order
/// and each peer's configured parent.
fn join_random(seed: u64, n: usize, over: Duration) -> (Sim, Vec<usize>, Vec<Option<usize>>) {
    let mut sim = Sim::new(seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    sim.add_hosts(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut times: Vec<Duration> = (0..n).map(|_| over.mul_f64(rng.random_range(0.0..1.0))).collect();
    times.sort();
    times[0] = Duration::ZERO;
    let mut parent = vec![None; n];
    for k in 0..n {
        sim.run_until(times[k]);
        let i = order[k];
        let p = (k > 0).then(|| order[rng.random_range(0..k)]);
        parent[i] = p;
        sim.launch(i, p.as_slice());
    }
    (sim, order, parent)
}

/// Runs until the live nodes converged on exactly themselves, form a full
/// mesh and route to each other; returns how long that took.
fn converge(sim: &mut Sim, max: Duration, what: &str) -> Duration {
    let live = sim.live();
    let took = sim.run_until_cond(max, |s| s.converged_on_live() && s.full_mesh(&live) && s.all_routes(&live));
    let Some(took) = took else {
        panic!(
            "seed={}: {what}: no convergence within {max:?} (converged={}, on_live={}, full_mesh={}, routes={})",
            sim.seed(),
            sim.converged(),
            sim.converged_on_live(),
            sim.full_mesh(&live),
            sim.all_routes(&live)
        )
    };
    sim.assert_loop_free();
    took
}

#[test]
fn two_nodes_connect() {
    for seed in seeds(8) {
        let _g = SeedGuard(seed);
        let mut sim = Sim::new(seed);
        let b = sim.add_node(&[]);
        let a = sim.add_node(&[b]);
        let took = sim.run_until_cond(secs(5), |s| s.full_mesh(&[a, b]) && s.converged_on_live());
        assert!(took.is_some(), "seed={seed}: A and B not connected with routes within 5 s");
        let ra = sim.router(a).expect("a alive");
        assert_eq!(ra.connections().len(), 1, "seed={seed}: A has one connection");
        assert_eq!(ra.routes().next_hop(Sim::name(b)), Some(Sim::name(b)), "seed={seed}");
        let rb = sim.router(b).expect("b alive");
        assert_eq!(rb.routes().next_hop(Sim::name(a)), Some(Sim::name(a)), "seed={seed}");
        sim.assert_loop_free();
    }
}

// Convergence (time after the last join at ~30 s until every peer knows all,
// the full mesh is up and everyone routes to everyone; checked every 100 ms),
// release build: 20 peers, seeds 0..4, within 0.4-1.6 s of the last join; 50
// peers, seed 0: 0.8 s after the last join (444 000 events). Deltas of a peer's
// own entry go to `fanout` neighbours plus the peers whose connection changed,
// so convergence takes a few gossip hops instead of one broadcast.
fn join_and_converge(seed: u64, n: usize) {
    let _g = SeedGuard(seed);
    let (mut sim, _, _) = join_random(seed, n, secs(30));
    let took = converge(&mut sim, secs(90), "joins");
    eprintln!("seed={seed}: {n} peers converged {took:?} after the last join, {} steps", sim.steps());
}

#[test]
fn fifty_peers_converge() {
    for seed in seeds(1) {
        join_and_converge(seed, 50);
    }
}

#[test]
fn peers_converge_over_many_seeds() {
    for seed in seeds(4) {
        join_and_converge(seed, peers());
    }
}

/// Split a converged mesh in two halves; each converges on itself with no
/// routes across; heal; all converge again. Measured (release, seed 0, 50
/// peers): split converged in 0.8 s, healed in 1.9 s.
fn partition_then_heal(seed: u64, n: usize) {
    let _g = SeedGuard(seed);
    let (mut sim, order, _) = join_random(seed, n, secs(30));
    converge(&mut sim, secs(90), "before partition");
    // Halves by join order, so each side holds configured targets into the other.
    let mut sides = vec![0u32; n];
    for (k, &i) in order.iter().enumerate() {
        sides[i] = u32::from(k % 2 == 1);
    }
    let halves: [Vec<usize>; 2] = [0, 1].map(|s| (0..n).filter(|i| sides[*i] == s).collect());
    sim.partition(&sides);
    let took = sim.run_until_cond(secs(60), |s| {
        halves.iter().all(|h| {
            s.converged_group(h) && s.full_mesh(h) && h.iter().all(|&i| s.router(i).is_some_and(|r| r.topology().len() == h.len()))
        })
    });
    assert!(took.is_some(), "seed={seed}: halves did not converge on themselves within 60 s");
    for h in &halves {
        for &i in h {
            let r = sim.router(i).expect("alive");
            for j in 0..n {
                if sides[j] != sides[i] {
                    assert!(r.topology().get(Sim::name(j)).is_none(), "seed={seed}: {i} still knows {j}");
                    assert!(r.routes().next_hop(Sim::name(j)).is_none(), "seed={seed}: {i} routes to {j}");
                }
            }
        }
    }
    sim.assert_loop_free();
    sim.heal();
    let healed = converge(&mut sim, secs(120), "after heal");
    eprintln!("seed={seed}: {n} peers: split converged in {took:?}, healed in {healed:?}", took = took.expect("checked"));
}

#[test]
fn fifty_peers_partition_and_heal() {
    for seed in seeds(1) {
        partition_then_heal(seed, 50);
    }
}

#[test]
fn partition_and_heal() {
    for seed in seeds(3) {
        partition_then_heal(seed, peers());
    }
}

#[test]
fn kill_and_restart() {
    for seed in seeds(4) {
        let _g = SeedGuard(seed);
        let (mut sim, _, _) = join_random(seed, 20, secs(10));
        converge(&mut sim, secs(60), "before kill");
        let victim = 7;
        let old_uid = sim.router(victim).expect("alive").config().uid;
        sim.kill(victim);
        let rest = sim.live();
        let dropped = sim.run_until_cond(secs(60), |s| {
            s.converged_on_live()
                && s.all_routes(&rest)
                && rest.iter().all(|&i| s.router(i).is_some_and(|r| r.topology().get(Sim::name(victim)).is_none()))
        });
        assert!(dropped.is_some(), "seed={seed}: survivors did not drop node {victim} within 60 s");
        sim.restart(victim, &[rest[0]]);
        let back = converge(&mut sim, secs(60), "after restart");
        let new_uid = sim.router(victim).expect("alive").config().uid;
        assert_ne!(new_uid, old_uid, "seed={seed}");
        for &i in &rest {
            let r = sim.router(i).expect("alive");
            let p = r.topology().get(Sim::name(victim)).expect("knows the restarted node");
            assert_eq!(p.uid, new_uid, "seed={seed}: node {i} has a stale uid for {victim}");
            // Routed directly, or through a peer when that is faster.
            let via = sim.route_rtt(i, victim).unwrap_or_else(|| panic!("seed={seed}: no route {i} -> {victim}"));
            assert!(via <= sim.route_rtt_direct(i, victim), "seed={seed}");
        }
        eprintln!("seed={seed}: dropped in {:?}, back in {back:?}", dropped.expect("checked"));
    }
}

/// A restarted peer whose `initial_version` is below its previous life's
/// (a clock stepped back) must still win over its stale entry.
#[test]
fn restart_with_lower_version() {
    for seed in seeds(4) {
        let _g = SeedGuard(seed);
        let (mut sim, _, _) = join_random(seed, 10, secs(5));
        converge(&mut sim, secs(60), "before kill");
        let rest: Vec<usize> = (1..10).collect();
        sim.kill(0);
        // Restart at once, before the others have forgotten the old entry.
        sim.restart_with_version(0, &[rest[0]], 1);
        converge(&mut sim, secs(60), "after restart with version 1");
    }
}

#[test]
fn random_operations() {
    for seed in seeds(8) {
        let _g = SeedGuard(seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfeed);
        let mut sim = Sim::new(seed);
        let max = 16;
        sim.add_hosts(max);
        // Configured parent of each launched node (launch arguments are kept
        // across restarts, so the configured graph stays a spanning tree).
        let mut parent: Vec<Option<usize>> = vec![None; max];
        let mut launched = 0usize;
        sim.launch(0, &[]);
        launched += 1;
        for _ in 0..40 {
            let live = sim.live();
            let dead: Vec<usize> = (0..launched).filter(|i| !sim.is_alive(*i)).collect();
            match rng.random_range(0..6) {
                0 | 1 if launched < max => {
                    let p = live[rng.random_range(0..live.len())];
                    parent[launched] = Some(p);
                    sim.launch(launched, &[p]);
                    launched += 1;
                }
                2 if live.len() > 2 => sim.kill(live[rng.random_range(0..live.len())]),
                3 if !dead.is_empty() => {
                    let i = dead[rng.random_range(0..dead.len())];
                    let t = parent[i].unwrap_or(live[rng.random_range(0..live.len())]);
                    if rng.random_bool(0.25) {
                        sim.restart_with_version(i, &[t], 1);
                    } else {
                        sim.restart(i, &[t]);
                    }
                }
                4 => {
                    let sides: Vec<u32> = (0..max).map(|_| rng.random_range(0..2)).collect();
                    sim.partition(&sides);
                }
                _ => sim.heal(),
            }
            sim.run_for(Duration::from_millis(rng.random_range(0..8_000)));
        }
        sim.heal();
        let dead: Vec<usize> = (0..launched).filter(|i| !sim.is_alive(*i)).collect();
        for i in dead {
            let t = parent[i].unwrap_or(sim.live()[0]);
            sim.restart(i, &[t]);
        }
        let took = converge(&mut sim, secs(120), "after random operations");
        eprintln!("seed={seed}: {launched} nodes converged {took:?} after the final heal");
    }
}

/// Steady-state gossip per node per interval must be O(fanout), not O(N).
/// In steady state the core sends a full topology to `fanout` (4) random
/// neighbours per jittered interval (0.8-1.2 x) and nothing else, so a node
/// sends about 4 messages per interval; 2 x fanout leaves room for jitter.
#[test]
fn gossip_fanout_is_bounded() {
    for seed in seeds(2) {
        let _g = SeedGuard(seed);
        let n = peers();
        let (mut sim, _, _) = join_random(seed, n, secs(30));
        converge(&mut sim, secs(90), "before measuring");
        // Let the last own-entry updates settle before measuring.
        sim.run_for(GOSSIP_INTERVAL * 2);
        let before: Vec<u64> = (0..n).map(|i| sim.sent(i)).collect();
        let intervals = 20u32;
        sim.run_for(GOSSIP_INTERVAL * intervals);
        assert!(sim.converged_on_live(), "seed={seed}: steady state changed");
        let fanout = sim.router(0).expect("alive").config().fanout as u64;
        let per: Vec<f64> = (0..n).map(|i| (sim.sent(i) - before[i]) as f64 / f64::from(intervals)).collect();
        let worst = per.iter().copied().fold(0.0, f64::max);
        eprintln!("seed={seed}: worst node sent {worst:.2} messages per gossip interval (fanout {fanout})");
        assert!(worst <= (2 * fanout) as f64, "seed={seed}: a node sent {worst:.2} messages per interval, bound {}", 2 * fanout);
        assert!(per.iter().all(|p| *p > 0.0), "seed={seed}: some node sent no anti-entropy at all");
    }
}

/// Minimal reproduction of the gossip storm after a kill: the dead peer's
/// entry is merged as new, spread to `fanout` neighbours, then removed by gc
/// (nobody announces a connection to it), so the next copy is new again and
/// the epidemic never dies out. Each survivor should send O(fanout) messages
/// per interval once the survivors agree the peer is gone.
#[test]
fn dead_peer_entry_dies_out() {
    for seed in seeds(4) {
        let _g = SeedGuard(seed);
        let (mut sim, _, _) = join_random(seed, 20, secs(10));
        converge(&mut sim, secs(30), "before kill");
        sim.kill(7);
        sim.run_for(secs(5));
        let before: Vec<u64> = (0..20).map(|i| sim.sent(i)).collect();
        sim.run_for(GOSSIP_INTERVAL * 10);
        for i in sim.live() {
            let sent = sim.sent(i) - before[i];
            assert!(sent <= 80, "seed={seed}: node {i} sent {sent} messages in 10 quiet gossip intervals");
        }
    }
}

/// Unicast routes follow the lowest round-trip time once the routers know it, not the fewest
/// hops: a triangle whose direct edge is slow routes around it; in a mesh with random link
/// latencies every route is no slower than the direct connection and routes stay loop-free
/// (checked as the sim runs).
#[test]
fn routes_follow_the_lowest_round_trip_time() {
    let mut sim = Sim::new(7);
    sim.add_hosts(3);
    sim.set_latency(0, 2, Duration::from_millis(40));
    sim.set_latency(0, 1, Duration::from_millis(2));
    sim.set_latency(1, 2, Duration::from_millis(3));
    sim.launch(0, &[]);
    sim.launch(1, &[0]);
    sim.launch(2, &[0, 1]);
    converge(&mut sim, secs(60), "triangle");
    assert!(sim.full_mesh(&[0, 1, 2]), "all three connected directly");
    sim.run_for(secs(10));
    assert_eq!(sim.router(0).and_then(|r| r.routes().next_hop(Sim::name(2))), Some(Sim::name(1)), "0 reaches 2 through 1 (10 ms) rather than directly (80 ms)");
    assert_eq!(sim.router(2).and_then(|r| r.routes().next_hop(Sim::name(0))), Some(Sim::name(1)), "and back");
    assert_eq!(sim.route_rtt(0, 2), Some(Duration::from_millis(10)));
    assert_eq!(sim.router(0).and_then(|r| r.routes().next_hop(Sim::name(1))), Some(Sim::name(1)));

    for seed in seeds(4) {
        let _g = SeedGuard(seed);
        let n = 12;
        let (mut sim, _, _) = join_random(seed, n, secs(5));
        converge(&mut sim, secs(300), "random latencies");
        sim.run_for(secs(20));
        sim.assert_loop_free();
        for src in 0..n {
            for dst in (0..n).filter(|d| *d != src) {
                let via = sim.route_rtt(src, dst).unwrap_or_else(|| panic!("seed={seed}: no route {src} -> {dst}"));
                if sim.router(src).is_some_and(|r| r.connections().values().any(|c| c.peer == Sim::name(dst))) {
                    let direct = sim.route_rtt_direct(src, dst);
                    assert!(via <= direct, "seed={seed}: {src} -> {dst} takes {via:?}, the direct connection {direct:?}");
                }
            }
        }
    }
}
