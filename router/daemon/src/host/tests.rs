//! Tests of the host layer on real kernel parts (root; each runs in a private network namespace
//! and skips with a message otherwise).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::LinkVeth;

use super::attach::host_ifname_for;
use super::netlink::{is_bridge, mtu_of, NetDev, MAX_IFNAME_LEN, check_ifname};
use super::netns::{in_netns, open_netns};
use super::sysctl::disable_ipv6;
use std::path::PathBuf;
use std::sync::mpsc;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the test body on a thread in a fresh private network namespace.
/// Runs `f` in a fresh private network namespace; skips (with a message) when not root.
fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let joined = std::thread::spawn(move || -> Result<()> {
        // SAFETY: unshare(CLONE_NEWNET) only affects this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
    .join();
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// A "container" namespace: a thread that unshared and stays alive until dropped.
struct TestNs {
    path: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestNs {
    fn new() -> Result<Self> {
        Self::with_ipv6(true)
    }

    /// With `ipv6 == false`, interfaces that later enter the namespace get IPv6 disabled.
    fn with_ipv6(ipv6: bool) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: only affects this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            let res = if rc == 0 {
                if ipv6 {
                    Ok(())
                } else {
                    // /proc/sys/net follows the calling thread's namespace.
                    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", b"1")
                        .map_err(|e| e.to_string())
                }
                // SAFETY: gettid has no preconditions.
                .map(|()| unsafe { libc::gettid() })
            } else {
                Err(io::Error::last_os_error().to_string())
            };
            let _ = ready_tx.send(res);
            let _ = stop_rx.recv();
        });
        let tid = ready_rx.recv()?.map_err(|e| anyhow!("unshare: {e}"))?;
        Ok(Self {
            path: PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id())),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn link(nd: &NetDev, name: &str) -> Result<LinkMessage> {
    nd.get_link(name)
        .await?
        .ok_or_else(|| anyhow!("{name} missing"))
}

fn controller_of(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(m) => Some(*m),
        _ => None,
    })
}

fn is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

fn is_veth(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

async fn veth_count(nd: &NetDev) -> Result<usize> {
    let links: Vec<LinkMessage> = nd.handle.link().get().execute().try_collect().await?;
    Ok(links.iter().filter(|l| is_veth(l)).count())
}

/// Reads a link inside the namespace at `path`.
async fn link_in(ns: &TestNs, name: &str) -> Result<Option<LinkMessage>> {
    let file = open_netns(&ns.path)?;
    let name = name.to_owned();
    in_netns(&file, &ns.path, move |nd| async move {
        nd.get_link(&name).await
    })
    .await
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED))
}

#[test]
fn host_ifname_is_stable_and_short() {
    let a = host_ifname_for(Path::new("/run/netns/foo"), "eth0");
    assert_eq!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth0"));
    assert_eq!(a.len(), 12);
    assert!(a.len() <= MAX_IFNAME_LEN);
    assert!(a.starts_with("vw"));
    assert!(a[2..].chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth1"));
    assert_ne!(a, host_ifname_for(Path::new("/run/netns/fop"), "eth0"));
    // Pinned: must never change between releases (existing veths are found by it).
    assert_eq!(a, host_ifname_for(Path::new("/run/netns/foo"), "eth0"));
    assert_eq!(
        host_ifname_for(Path::new("/run/netns/foo"), "eth0"),
        PINNED_FOO_ETH0
    );
}

const PINNED_FOO_ETH0: &str = "vw18e2daeba6";

#[test]
fn rejects_bad_names() {
    assert!(check_ifname("").is_err());
    assert!(check_ifname("abcdefghijklmnop").is_err());
    assert!(check_ifname("a/b").is_err());
    assert!(check_ifname("eth 0").is_err());
    assert!(check_ifname("abcdefghijklmno").is_ok());
}

#[test]
fn bridge_is_idempotent_and_sets_mtu() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        let i1 = nd.ensure_bridge("weft", 1400).await?;
        let i2 = nd.ensure_bridge("weft", 1400).await?;
        assert_eq!(i1, i2);
        let l = link(&nd, "weft").await?;
        assert_eq!(mtu_of(&l), Some(1400));
        assert!(is_up(&l));
        assert!(is_bridge(&l));
        assert_eq!(nd.ensure_bridge("weft", 1376).await?, i1);
        assert_eq!(mtu_of(&link(&nd, "weft").await?), Some(1376));
        assert_eq!(nd.link_index("weft").await?, Some(i1));
        assert_eq!(nd.link_index("nosuchlink").await?, None);
        let err = nd
            .ensure_bridge("lo", 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("lo is no bridge"))?;
        assert!(format!("{err:#}").contains("not a bridge"), "{err:#}");
        // enslave: a stand-in for the router's TAP.
        nd.handle
            .link()
            .add(LinkVeth::new("taptest", "taptestpeer").build())
            .execute()
            .await?;
        nd.enslave("taptest", "weft").await?;
        let tap = link(&nd, "taptest").await?;
        assert_eq!(controller_of(&tap), Some(i1));
        assert!(is_up(&tap));
        let err = nd
            .enslave("taptest", "nobridge")
            .await
            .err()
            .ok_or_else(|| anyhow!("enslave to missing bridge"))?;
        assert!(format!("{err:#}").contains("nobridge"), "{err:#}");
        assert!(nd.enslave("notap", "weft").await.is_err());
        assert!(nd.delete_link("taptest").await?);
        nd.set_mtu("weft", 1300).await?;
        assert_eq!(mtu_of(&link(&nd, "weft").await?), Some(1300));
        assert!(nd.delete_link("weft").await?);
        assert!(!nd.delete_link("weft").await?);
        Ok(())
    });
}

#[test]
fn add_del_address_idempotent() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("weft", 1500).await?;
        let idx = nd.require_link("weft").await?;
        for (addr, prefix) in [(v4("10.47.0.1"), 16), (v6("fd47::1"), 64)] {
            nd.add_address("weft", addr, prefix).await?;
            nd.add_address("weft", addr, prefix).await?;
            let list = nd.addresses_of(idx).await?;
            assert_eq!(
                list.iter().filter(|x| **x == (addr, prefix)).count(),
                1,
                "{list:?}"
            );
            assert!(nd.del_address("weft", addr, prefix).await?);
            assert!(!nd.del_address("weft", addr, prefix).await?);
            assert!(!nd.addresses_of(idx).await?.contains(&(addr, prefix)));
        }
        assert!(nd.add_address("nosuch", v4("10.47.0.1"), 16).await.is_err());
        assert!(nd.add_address("weft", v4("10.47.0.1"), 33).await.is_err());
        Ok(())
    });
}

#[test]
fn attach_end_to_end_and_detach() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        let br = nd.ensure_bridge("weft", 1400).await?;
        let ns = TestNs::new()?;
        let addrs = [(v4("10.47.0.2"), 16), (v6("fd47::2"), 64)];
        let info = nd
            .attach_netns("weft", &ns.path, "ethwe", &addrs, 1400)
            .await?;
        assert_eq!(info.host_ifname, host_ifname_for(&ns.path, "ethwe"));
        assert_eq!(info.container_ifname, "ethwe");

        // Host end: enslaved, up, MTU.
        let host = link(&nd, &info.host_ifname).await?;
        assert_eq!(controller_of(&host), Some(br));
        assert!(is_up(&host));
        assert_eq!(mtu_of(&host), Some(1400));
        // The temporary peer name is gone from the host namespace.
        assert_eq!(
            nd.link_index(&format!("vp{}", &info.host_ifname[2..]))
                .await?,
            None
        );

        // Container end.
        let got = nd.netns_addresses(&ns.path, "ethwe").await?;
        for a in addrs {
            assert!(got.contains(&a), "{a:?} not in {got:?}");
        }
        let c = link_in(&ns, "ethwe")
            .await?
            .ok_or_else(|| anyhow!("ethwe missing in ns"))?;
        assert!(is_up(&c));
        assert_eq!(mtu_of(&c), Some(1400));
        let mac = c.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => Some(b.clone()),
            _ => None,
        });
        assert_eq!(mac.as_deref(), Some(&info.container_mac[..]));
        let lo = link_in(&ns, "lo")
            .await?
            .ok_or_else(|| anyhow!("lo missing in ns"))?;
        assert!(is_up(&lo));

        // Detach.
        assert!(nd.detach_netns(&ns.path, "ethwe").await?);
        assert_eq!(nd.link_index(&info.host_ifname).await?, None);
        assert!(link_in(&ns, "ethwe").await?.is_none());
        assert!(!nd.detach_netns(&ns.path, "ethwe").await?);
        assert_eq!(veth_count(&nd).await?, 0);
        Ok(())
    });
}

#[test]
fn attach_twice_fails_without_leftovers() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("weft", 1500).await?;
        let ns = TestNs::new()?;
        let info = nd
            .attach_netns("weft", &ns.path, "ethwe", &[(v4("10.47.0.2"), 16)], 1500)
            .await?;
        assert_eq!(veth_count(&nd).await?, 1);
        let err = nd
            .attach_netns("weft", &ns.path, "ethwe", &[(v4("10.47.0.3"), 16)], 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("second attach succeeded"))?;
        let msg = format!("{err:#}");
        assert!(
            msg.contains("ethwe") && msg.contains(&*ns.path.to_string_lossy()),
            "{msg}"
        );
        assert!(msg.contains("already exists"), "{msg}");
        assert_eq!(veth_count(&nd).await?, 1);
        // The first attach is untouched.
        assert!(nd.link_index(&info.host_ifname).await?.is_some());
        let got = nd.netns_addresses(&ns.path, "ethwe").await?;
        assert!(got.contains(&(v4("10.47.0.2"), 16)), "{got:?}");
        assert!(!got.contains(&(v4("10.47.0.3"), 16)), "{got:?}");

        // An interface the container created itself (not through attach_netns) also
        // blocks an attach under its name, and is left alone.
        let file = open_netns(&ns.path)?;
        in_netns(&file, &ns.path, |nd| async move {
            nd.handle
                .link()
                .add(LinkVeth::new("eth1", "eth1peer").build())
                .execute()
                .await?;
            Ok(())
        })
        .await?;
        let err = nd
            .attach_netns("weft", &ns.path, "eth1", &[], 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("attach over existing eth1 succeeded"))?;
        assert!(format!("{err:#}").contains("eth1"), "{err:#}");
        assert_eq!(veth_count(&nd).await?, 1);
        Ok(())
    });
}

#[test]
fn attach_failures_leave_nothing_behind() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("weft", 1500).await?;

        // Nonexistent namespace.
        let missing = Path::new("/run/netns/weft-test-does-not-exist-4711");
        let err = nd
            .attach_netns("weft", missing, "ethwe", &[], 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("attach to missing ns succeeded"))?;
        let msg = format!("{err:#}");
        assert!(
            msg.contains("does not exist") && msg.contains(&*missing.to_string_lossy()),
            "{msg}"
        );
        assert_eq!(veth_count(&nd).await?, 0);

        // A file that is not a namespace.
        let not_ns = Path::new("/proc/self/status");
        let err = nd
            .attach_netns("weft", not_ns, "ethwe", &[], 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("attach to non-ns succeeded"))?;
        assert!(
            format!("{err:#}").contains("not a network namespace"),
            "{err:#}"
        );
        assert_eq!(veth_count(&nd).await?, 0);

        // Missing bridge.
        let ns = TestNs::new()?;
        let err = nd
            .attach_netns("nobridge", &ns.path, "ethwe", &[], 1500)
            .await
            .err()
            .ok_or_else(|| anyhow!("attach to missing bridge succeeded"))?;
        assert!(format!("{err:#}").contains("nobridge"), "{err:#}");

        // Failure after the veth exists: an MTU the kernel rejects (below 68 for veth).
        let err = nd
            .attach_netns("weft", &ns.path, "ethwe", &[], 10)
            .await
            .err()
            .ok_or_else(|| anyhow!("attach with MTU 10 succeeded"))?;
        eprintln!("expected failure: {err:#}");
        assert_eq!(veth_count(&nd).await?, 0);
        assert!(link_in(&ns, "ethwe").await?.is_none());
        assert_eq!(
            nd.link_index(&host_ifname_for(&ns.path, "ethwe")).await?,
            None
        );

        // Failure after the container end was moved and renamed: an IPv6 address in a
        // namespace where IPv6 is disabled on new interfaces.
        if Path::new("/proc/sys/net/ipv6").exists() {
            let no6 = TestNs::with_ipv6(false)?;
            let err = nd
                .attach_netns(
                    "weft",
                    &no6.path,
                    "ethwe",
                    &[(v4("10.47.0.2"), 16), (v6("fd47::2"), 64)],
                    1500,
                )
                .await
                .err()
                .ok_or_else(|| anyhow!("IPv6 address on IPv6-disabled interface succeeded"))?;
            let msg = format!("{err:#}");
            eprintln!("expected failure: {msg}");
            assert!(
                msg.contains("fd47::2")
                    && msg.contains("ethwe")
                    && msg.contains(&*no6.path.to_string_lossy()),
                "{msg}"
            );
            assert_eq!(veth_count(&nd).await?, 0);
            assert!(link_in(&no6, "ethwe").await?.is_none());
            let peer = format!("vp{}", &host_ifname_for(&no6.path, "ethwe")[2..]);
            assert!(link_in(&no6, &peer).await?.is_none());
        }
        Ok(())
    });
}

/// The rename-on-move step itself refuses a name that exists in the namespace (the race
/// the pre-check cannot cover), and deleting the host end cleans up the moved peer.
#[test]
fn pair_onto_existing_name_fails_and_leaves_nothing() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        let br = nd.ensure_bridge("weft", 1500).await?;
        let ns = TestNs::new()?;
        let file = open_netns(&ns.path)?;
        in_netns(&file, &ns.path, |nd| async move {
            nd.handle
                .link()
                .add(LinkVeth::new("ethx", "ethxpeer").build())
                .execute()
                .await?;
            Ok(())
        })
        .await?;
        // The name check before creation can lose a race; the kernel refuses then.
        let err = nd
            .create_pair("vwtest", "ethx", [2, 0, 0, 0, 0, 1], &file, "test", 1500, br)
            .await
            .err()
            .ok_or_else(|| anyhow!("pair onto existing name succeeded"))?;
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        assert_eq!(veth_count(&nd).await?, 0);
        assert!(nd.link_index("vwtest").await?.is_none());
        assert!(link_in(&ns, "ethx").await?.is_some());
        // And the normal case: the container end is born in the namespace, on its MTU.
        nd.create_pair("vwtest", "ethy", [2, 0, 0, 0, 0, 2], &file, "test", 1400, br).await?;
        let inside = link_in(&ns, "ethy").await?.ok_or_else(|| anyhow!("no ethy"))?;
        assert_eq!(mtu_of(&inside), Some(1400));
        assert_eq!(controller_of(&link(&nd, "vwtest").await?), Some(br));
        Ok(())
    });
}

#[test]
fn disable_ipv6_on_bridge() {
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("weft", 1500).await?;
        disable_ipv6("weft")?;
        if Path::new("/proc/sys/net/ipv6").exists() {
            let v = std::fs::read_to_string("/proc/sys/net/ipv6/conf/weft/disable_ipv6")?;
            assert_eq!(v.trim(), "1");
        }
        assert!(disable_ipv6("nosuchif").is_err() || !Path::new("/proc/sys/net/ipv6").exists());
        Ok(())
    });
}

#[test]
fn ping_between_two_attached_namespaces() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    if !Path::new("/usr/bin/nsenter").exists() || !Path::new("/usr/bin/ping").exists() {
        eprintln!("skipping: needs nsenter and ping");
        return;
    }
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("weft", 1500).await?;
        let a = TestNs::new()?;
        let b = TestNs::new()?;
        nd.attach_netns("weft", &a.path, "ethwe", &[(v4("10.47.0.2"), 24)], 1500)
            .await?;
        nd.attach_netns("weft", &b.path, "ethwe", &[(v4("10.47.0.3"), 24)], 1500)
            .await?;
        let mut ok = false;
        for _ in 0..5 {
            // Blocking is fine here: nothing else runs on this test's runtime meanwhile.
            let status = std::process::Command::new("nsenter")
                .arg(format!("--net={}", a.path.display()))
                .args(["ping", "-c1", "-W1", "10.47.0.3"])
                .stdout(std::process::Stdio::null())
                .status()?;
            if status.success() {
                ok = true;
                break;
            }
        }
        assert!(ok, "ping from namespace a to b over the bridge failed");
        Ok(())
    });
}

/// `ip -d -j link show IF` in the calling thread's namespace.
fn ip_details(ifname: &str) -> Result<serde_json::Value> {
    let o = std::process::Command::new("ip").args(["-d", "-j", "link", "show", ifname]).output()?;
    if !o.status.success() {
        bail!("ip link show {ifname}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v[0].clone())
}

#[test]
fn the_fastpath_device_is_isolated_from_the_tap_and_programmed_per_mac() {
    use super::vxlan::VXLAN_MTU;
    in_private_netns(|| async {
        let nd = NetDev::new().await?;
        nd.ensure_bridge("wb", 1376).await?;
        nd.handle.link().add(LinkVeth::new("wbtap", "wbtappeer").build()).execute().await?;
        nd.enslave("wbtap", "wb").await?;
        let vx = nd.make_vxlan("wb-vx", 0x776674, 6784, "wb", "wbtap").await?;
        let d = ip_details("wb-vx")?;
        let info = &d["linkinfo"];
        assert_eq!(info["info_kind"], "vxlan", "{d}");
        assert_eq!(info["info_data"]["id"], 0x776674, "{d}");
        assert_eq!(info["info_data"]["port"], 6784, "{d}");
        assert_eq!(info["info_data"]["learning"], false, "{d}");
        assert_eq!(d["mtu"], VXLAN_MTU, "{d}");
        let port = &info["info_slave_data"];
        for (flag, want) in [("isolated", true), ("learning", false), ("flood", false), ("mcast_flood", false), ("bcast_flood", false)] {
            assert_eq!(port[flag], want, "VXLAN port flag {flag}: {d}");
        }
        let tap = ip_details("wbtap")?;
        assert_eq!(tap["linkinfo"]["info_slave_data"]["isolated"], true, "{tap}");
        // One MAC: a device entry to the peer, a sticky static bridge entry to the device.
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let peer: IpAddr = "192.0.2.9".parse()?;
        nd.vxlan_fdb_add(vx, mac, peer, 6784).await?;
        nd.bridge_fdb_add(vx, mac).await?;
        let entries = nd.vxlan_fdb(vx).await?;
        let o = std::process::Command::new("bridge").args(["-d", "fdb", "show", "dev", "wb-vx"]).output()?;
        assert!(entries.contains(&(mac, Some(peer))), "{entries:?} / {}", String::from_utf8_lossy(&o.stdout));
        let idle = nd.bridge_fdb_idle(vx).await?;
        assert!(idle.iter().any(|(m, _)| *m == mac), "{idle:?}");
        let o = std::process::Command::new("bridge").args(["-j", "fdb", "show", "dev", "wb-vx"]).output()?;
        let fdb = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(fdb.contains("\"sticky\"") && fdb.contains("\"static\""), "{fdb}");
        // Replacing is idempotent; removing says whether there was an entry.
        nd.vxlan_fdb_add(vx, mac, peer, 6784).await?;
        nd.bridge_fdb_add(vx, mac).await?;
        assert!(nd.bridge_fdb_del(vx, mac).await?);
        assert!(!nd.bridge_fdb_del(vx, mac).await?);
        assert!(nd.vxlan_fdb_del(vx, mac).await?);
        assert!(!nd.vxlan_fdb_del(vx, mac).await?);
        // A restart rebuilds the device: nothing of the old one's entries survives.
        nd.vxlan_fdb_add(vx, mac, peer, 6784).await?;
        let vx2 = nd.make_vxlan("wb-vx", 0x776674, 6784, "wb", "wbtap").await?;
        assert!(nd.vxlan_fdb(vx2).await?.iter().all(|(m, _)| *m != mac));
        // The port taken by another program: a clear error, and no device left behind.
        let _held = std::net::UdpSocket::bind("0.0.0.0:6785")?;
        let err = nd.make_vxlan("wb-vx", 0x776674, 6785, "wb", "wbtap").await.err().ok_or_else(|| anyhow!("port 6785 is taken"))?;
        assert!(format!("{err:#}").contains("UDP port 6785 is taken"), "{err:#}");
        assert_eq!(nd.link_index("wb-vx").await?, None);
        Ok(())
    });
}
