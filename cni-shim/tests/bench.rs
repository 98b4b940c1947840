//! Benchmark: ADD+DEL latency of weft-cni against Debian's reference plugins
//! `bridge` with `host-local`, in the same run, driven by the same spec-following
//! runtime (tests/common), in the same lab host namespace: 100 ADD/DEL pairs
//! each, interleaved. Prints p50/p99 and the ratios; asserts only that every
//! call succeeded and nothing was left behind (figures go to
//! docs/benchmarks.md; `bench/cni-latency.sh` runs this). Needs root and
//! containernetworking-plugins; skips with a message otherwise.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{allocations, lab, links, plugin_dir, weft_conflist, Attachment, Runtime};
use serde_json::json;

const REFERENCE: &str = "/usr/lib/cni";

fn pairs() -> usize {
    std::env::var("WEFT_CNI_BENCH_PAIRS").ok().and_then(|s| s.parse().ok()).unwrap_or(100)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn add_del_latency_against_bridge_host_local() {
    if !PathBuf::from(REFERENCE).join("bridge").is_file() {
        eprintln!("skipping add_del_latency_against_bridge_host_local: no reference plugins in {REFERENCE} (apt-get install containernetworking-plugins)");
        return;
    }
    let Some(mut lab) = lab("add_del_latency_against_bridge_host_local", 1, &[]) else { return };
    let host = lab.host(0).ns.clone();
    let dir = plugin_dir(&lab.dir().join("bench"));
    let mut weft = Runtime::new(weft_conflist("1.0.0", &lab.host(0).api_socket, json!({})), vec![dir], &host);
    let reference = json!({
        "cniVersion": "1.0.0", "name": "reference",
        "plugins": [{
            "type": "bridge", "bridge": "refbr0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.88.0.0/16" }]], "routes": [{ "dst": "0.0.0.0/0" }],
                      "dataDir": lab.dir().join("host-local").display().to_string() }
        }]
    });
    let mut refrt = Runtime::new(reference, vec![PathBuf::from(REFERENCE)], &host);
    let wns = format!("/run/netns/{}", lab.add_namespace("bw").expect("ns"));
    let rns = format!("/run/netns/{}", lab.add_namespace("br").expect("ns"));

    // One warm-up pair each (weft's first ADD agrees on the ring and gives the host its gateway).
    for (rt, ns) in [(&mut weft, &wns), (&mut refrt, &rns)] {
        let a = Attachment::new("warmup", ns);
        rt.add(&a).ok();
        assert_eq!(rt.del(&a).code(), 0);
    }
    let n = pairs();
    let (mut tw, mut tr) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        for (rt, ns, times) in [(&mut weft, &wns, &mut tw), (&mut refrt, &rns, &mut tr)] {
            let a = Attachment::new(&format!("bench-{i}"), ns);
            let t = Instant::now();
            rt.add(&a).ok();
            let d = rt.del(&a);
            times.push(t.elapsed());
            assert_eq!(d.code(), 0, "{d:?}");
        }
    }
    tw.sort();
    tr.sort();
    let (w50, w99, r50, r99) = (percentile(&tw, 0.5), percentile(&tw, 0.99), percentile(&tr, 0.5), percentile(&tr, 0.99));
    eprintln!("ADD+DEL latency, {n} pairs each (ms):");
    eprintln!("  weft-cni             p50 {:7.2}  p99 {:7.2}", ms(w50), ms(w99));
    eprintln!("  bridge + host-local  p50 {:7.2}  p99 {:7.2}", ms(r50), ms(r99));
    eprintln!("  ratio weft/reference p50 {:.2}  p99 {:.2}   (target: p50 at most 1.5)", ms(w50) / ms(r50), ms(w99) / ms(r99));

    // Nothing left behind by either.
    assert!(!allocations(&lab, 0).iter().any(|(id, _)| id.starts_with("cni:")), "{:?}", allocations(&lab, 0));
    assert!(!links(&lab, &host).iter().any(|l| l.starts_with("vw") || l.starts_with("veth")), "{:?}", links(&lab, &host));
}
