//! Helpers for the end-to-end lab tests: labs with real `weft` routers, an
//! AF_PACKET capture on a lab host's underlay, and sockets opened inside a
//! lab namespace.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_lab::{Container, Lab, LabConfig};

/// A lab of `hosts` hosts with the test binary's `weft`. `None` when not root (the test skips).
pub fn lab(test: &str, hosts: usize, password: Option<&str>, router_args: &[&str]) -> Option<Lab> {
    if !weft_lab::require_root(test) {
        return None;
    }
    let _ = weft_lab::cleanup_stale();
    let mut cfg = LabConfig::new(hosts, env!("CARGO_BIN_EXE_weft"));
    cfg.password = password.map(str::to_string);
    cfg.router_args = router_args.iter().map(|s| s.to_string()).collect();
    Some(Lab::new(cfg).expect("building the lab"))
}

/// Starts routers: host 0 alone, every other host given host 0.
pub fn start_star(lab: &mut Lab) {
    let n = lab.hosts().len();
    for i in 0..n {
        let peers: Vec<usize> = if i == 0 { vec![] } else { vec![0] };
        lab.start_router(i, &peers).expect("starting router");
    }
}

/// Pings `ip` from `c` until it answers or `timeout` passes; returns whether it did.
pub fn ping_until(lab: &Lab, c: &Container, ip: &str, extra: &[&str], timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        let mut args = vec!["ping", "-c", "1", "-W", "1"];
        args.extend_from_slice(extra);
        args.push(ip);
        if lab.exec(&c.ns, &args).map(|o| o.status.success()).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// `weft status --json` of host `i`.
pub fn status(lab: &Lab, i: usize) -> Value {
    lab.weft_json(i, &["status"]).expect("weft status")
}

/// Number of connections of host `i` in state `established`.
pub fn established(lab: &Lab, i: usize) -> usize {
    status(lab, i)["connections"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["state"] == "established").count())
        .unwrap_or(0)
}

pub use weft_lab::wait_for;

/// Runs `f` on a thread that has entered network namespace `ns` (a lab namespace).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// Frames captured with an AF_PACKET socket on one interface of a lab namespace.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing every frame on `ifname` in namespace `ns`.
    pub fn start(ns: &str, ifname: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s2, f2, ns, ifname) = (stop.clone(), frames.clone(), ns.to_string(), ifname.to_string());
        let thread = std::thread::spawn(move || {
            let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let cname = std::ffi::CString::new(ifname).expect("ifname");
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(idx > 0, "no interface in {ns}");
            // SAFETY: zeroed sockaddr_ll is valid; we fill family, protocol and index.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = idx as i32;
            // SAFETY: bind with a sockaddr_ll of the right size.
            let r = unsafe {
                libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
            };
            assert_eq!(r, 0, "bind AF_PACKET");
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            // SAFETY: SO_RCVTIMEO with a timeval.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), 16);
            }
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 70_000];
            while !s2.load(Ordering::Relaxed) {
                // SAFETY: recv into our buffer.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    f2.lock().expect("frames").push(buf[..n as usize].to_vec());
                }
            }
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("capture started");
        Capture { stop, frames, thread: Some(thread) }
    }

    /// Stops and returns the frames.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("capture thread");
        }
        std::mem::take(&mut *self.frames.lock().expect("frames"))
    }
}

/// UDP payloads (IPv4, no IP options assumed beyond IHL) to destination `port` in captured frames.
pub fn udp_payloads(frames: &[Vec<u8>], port: u16) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames {
        if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let udp = &ip[ihl..];
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if dport == port && len >= 8 && udp.len() >= len {
            out.push(udp[8..len].to_vec());
        }
    }
    out
}

/// Whether `needle` occurs in any frame.
pub fn contains(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames.iter().any(|f| f.windows(needle.len()).any(|w| w == needle))
}

/// Sends UDP datagrams carrying `payload` from container `c` to `ip:port` (inside the lab).
pub fn send_udp(c: &Container, ip: &str, port: u16, payload: &[u8], count: usize) {
    let (ip, payload) = (ip.to_string(), payload.to_vec());
    in_netns(&c.ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..count {
            let _ = s.send_to(&payload, (ip.as_str(), port));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

/// A child process killed and reaped when dropped.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` inside lab namespace `ns` (output discarded); killed when the guard drops.
pub fn spawn_in(ns: &str, cmd: &[&str]) -> Reaped {
    let child = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(cmd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?} in {ns}: {e}"));
    Reaped(child)
}

/// A small tmpfs mounted over a directory for a test (a disk that can be filled); unmounted on
/// drop. Mount it before the router that uses the directory starts.
pub struct Tmpfs {
    dir: std::path::PathBuf,
    filler: std::path::PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "1m") over `dir`.
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(ok.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs { dir: dir.to_path_buf(), filler: dir.join("filler") }
    }

    /// Fills it: writes a file until the disk says it is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = File::create(&self.filler).expect("creating the filler");
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", self.dir.display());
                    break;
                }
            }
        }
        let _ = f.sync_all();
    }

    /// Gives the space back.
    pub fn free(&self) {
        std::fs::remove_file(&self.filler).expect("removing the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a router may still hold files in it; it writes to the directory below after.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Pings of 8000 bytes from `c` to `ip` across the mesh, container MTU 1376: without DF they are
/// fragmented by the container's kernel and get through; with DF they are refused at the source
/// with the MTU (never a silent drop).
pub fn oversized_pings_fragment_or_get_the_mtu(lab: &Lab, c: &Container, ip: &str) {
    let o = lab.exec(&c.ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "dont", "-s", "8000", ip]).expect("ping");
    assert!(o.status.success(), "8000-byte ping without DF: {}", String::from_utf8_lossy(&o.stdout));
    let o = lab.exec(&c.ns, &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "8000", ip]).expect("ping");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && text.contains("mtu=1376"), "8000-byte DF ping: {text}");
}

/// Containers j1 (10.50.1.1) on host 0 and j2 (10.50.1.2) on host 1, attached with MTU 9000.
pub fn jumbo_pair(lab: &mut Lab) -> (Container, Container) {
    let j1 = lab.add_container(0, "j1", "10.50.1.1/24").expect("j1");
    let j2 = lab.add_container(1, "j2", "10.50.1.2/24").expect("j2");
    for (h, c, ip) in [(0, &j1.ns, "10.50.1.1/24"), (1, &j2.ns, "10.50.1.2/24")] {
        lab.weft(h, &["detach", c]).expect("detach");
        let o = lab.weft(h, &["attach", c, ip, "--mtu", "9000"]).expect("attach jumbo");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    (j1, j2)
}

/// Sends raw Ethernet frames (each at least 14 bytes) out of interface ethwe of container `c`,
/// as a process with CAP_NET_RAW in it could.
pub fn send_frames(c: &Container, frames: Vec<Vec<u8>>) {
    in_netns(&c.ns, move || {
        // SAFETY: plain socket(2), owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is ours.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new("ethwe").expect("name");
        // SAFETY: NUL-terminated name.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(idx > 0, "no ethwe in the container");
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = idx as i32;
        sa.sll_halen = 6;
        for f in frames {
            sa.sll_addr[..6].copy_from_slice(&f[..6]);
            loop {
                // SAFETY: valid buffer and address.
                let n = unsafe {
                    libc::sendto(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0, (&sa as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
                };
                if n == f.len() as isize {
                    break;
                }
                let e = std::io::Error::last_os_error();
                // A full queue under a flood: wait for it to drain.
                assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "sending a raw frame: {e}");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
}

/// An ARP frame (`op` 1 request, 2 reply), broadcast, from `mac` claiming `ip`, padded to 60 bytes.
pub fn arp_frame(op: u8, mac: [u8; 6], ip: [u8; 4], target_mac: [u8; 6], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(if op == 1 { &[0; 6] } else { &target_mac });
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// The MAC of interface ethwe in container `c`.
pub fn mac_of(lab: &Lab, c: &Container) -> [u8; 6] {
    let o = lab.exec(&c.ns, &["ip", "-o", "link", "show", "ethwe"]).expect("mac");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let s = out.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("").to_string();
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}

/// Whether iperf3 is installed; says the test is skipped when not.
pub fn have_iperf3(test: &str) -> bool {
    let there = std::process::Command::new("iperf3").arg("--version").output().is_ok();
    if !there {
        eprintln!("skipping {test}: iperf3 not installed");
    }
    there
}

/// One iperf3 TCP run of `secs` seconds from container `from` to `to` (a server started in
/// `to`'s namespace for it); its JSON report (`["end"]["sum_received"]["bytes"]`: what got across).
pub fn iperf3(lab: &Lab, from: &weft_lab::Container, to: &weft_lab::Container, secs: u32) -> Value {
    let _server = spawn_in(&to.ns, &["iperf3", "-s", "-1", "-p", "5201"]);
    std::thread::sleep(Duration::from_millis(500));
    let o = lab.exec(&from.ns, &["iperf3", "-c", &to.ip.to_string(), "-p", "5201", "-t", &secs.to_string(), "-J"]).expect("iperf3");
    assert!(o.status.success(), "iperf3: {}", String::from_utf8_lossy(&o.stdout));
    serde_json::from_slice(&o.stdout).expect("iperf3 json")
}
