//! The probes close every fd they open and leave no thread in a lab namespace. In a test binary
//! of its own: counting the process's open fds needs no other test running alongside.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use weft_lab::{probe, require_lab, Lab, LabConfig};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn probes_leak_no_fds() {
    if !require_lab("probes_leak_no_fds", &[]) {
        return;
    }
    let lab = Lab::new(LabConfig::new(2, "/nonexistent/weft")).unwrap();
    let h0 = lab.netns_path(&lab.host(0).ns).unwrap();
    let ip1 = lab.host(1).underlay_ip;
    let net = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let (fds, ns) = (open_fds(), net());
    for _ in 0..50 {
        probe::icmp_echo(&h0, ip1, Duration::from_secs(1)).unwrap();
    }
    for _ in 0..10 {
        // nothing listens on h1's UDP 53: refused, or (once the kernel rate-limits its port
        // unreachable messages) no answer in time
        assert!(probe::dns_query_a(&h0, ip1, "x.weft.local", Duration::from_millis(200)).is_err());
    }
    let nobody = Ipv4Addr::new(192, 168, 77, 200);
    assert!(probe::icmp_echo(&h0, nobody, Duration::from_millis(200)).is_err());
    assert!(probe::dns_query_a(&h0, nobody, "x.weft.local", Duration::from_millis(200)).is_err());
    assert_eq!(open_fds(), fds, "the probes leaked fds");
    assert_eq!(net(), ns, "the probes moved the calling thread");
}
