//! weft-cni under a real runtime: podman 4.3 (CNI backend) on two lab hosts,
//! with the plugin and configuration installed by `weft setup-cni`. Containers
//! on different hosts reach each other through weft and find each other by
//! name in weft DNS; `podman rm` gives the address and the name back.
//!
//! Each host's podman is isolated: its own storage, run and temp dirs, network
//! configuration dir and containers.conf (through `CONTAINERS_CONF`), all under
//! the lab's temp dir, and runs in the host's network namespace (`nsenter
//! --net=`, not `ip netns exec`, whose private mount namespace would hide the
//! namespaces podman makes under /run/netns). Containers run a static busybox
//! from a directory (`--rootfs`), so no image is pulled.
//!
//! Needs root, podman, runc and busybox-static; skips with a message otherwise.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{allocations, lab, links, wait_for};
use serde_json::Value;
use weft_lab::Lab;

/// Limit for one podman command.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// The static busybox the containers run.
const BUSYBOX: &str = "/bin/busybox";

static OUTPUTS: AtomicUsize = AtomicUsize::new(0);

/// One lab host's podman: its namespace and the dir holding all its state.
#[derive(Debug, Clone)]
struct Podman {
    host: usize,
    ns: String,
    dir: PathBuf,
}

impl Podman {
    /// Installs weft-cni with `weft setup-cni` for host `i` of `lab`, and writes the
    /// containers.conf and busybox root filesystem its podman uses.
    fn new(lab: &Lab, i: usize) -> Podman {
        let dir = lab.dir().join(format!("podman-h{i}"));
        for d in ["root", "runroot", "tmp", "out"] {
            fs::create_dir_all(dir.join(d)).expect("podman dirs");
        }
        let weft = weft_lab::find_weft_bin().expect("the weft binary");
        let out = run_limited(
            Command::new(&weft)
                .arg("setup-cni")
                .arg("--bin-dir")
                .arg(dir.join("bin"))
                .arg("--conf-dir")
                .arg(dir.join("net.d"))
                .arg("--socket")
                .arg(&lab.host(i).api_socket)
                .arg("--plugin")
                .arg(env!("CARGO_BIN_EXE_weft-cni"))
                .arg("--json"),
            &dir.join("out"),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "weft setup-cni on host {i}: {}", text(&out.stderr));
        let conflist: Value = serde_json::from_slice(&fs::read(dir.join("net.d/10-weft.conflist")).expect("conflist")).expect("conflist JSON");
        assert_eq!(conflist["name"], "weft", "{conflist}");
        assert_eq!(conflist["plugins"][0]["type"], "weft-cni", "{conflist}");
        assert!(dir.join("bin/weft-cni").is_file());

        let conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=16384:16384\", \"nproc=16384:16384\"]\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             lock_type = \"file\"\n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
            dir.join("bin").display()
        );
        fs::write(dir.join("containers.conf"), conf).expect("containers.conf");
        make_rootfs(&dir.join("rootfs"));
        Podman { host: i, ns: lab.host(i).ns.clone(), dir }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// `podman <args>` with this host's dirs and configuration, in its namespace.
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns)).arg("podman");
        for (flag, d) in [("--root", "root"), ("--runroot", "runroot"), ("--tmpdir", "tmp"), ("--network-config-dir", "net.d")] {
            c.arg(flag).arg(self.dir.join(d));
        }
        c.args(["--storage-driver", "vfs"]).args(args);
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        run_limited(&mut c, &self.dir.join("out"), PODMAN_TIMEOUT)
    }

    /// `podman <args>`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {} on host {} failed ({}): {}{}", args.join(" "), self.host, o.status, text(&o.stderr), text(&o.stdout));
        text(&o.stdout)
    }

    fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", name, "--format", format])
    }

    /// Runs `cmd` in container `name`: (success, stdout and stderr).
    fn exec(&self, name: &str, cmd: &[&str]) -> (bool, String) {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        let o = self.run(&args);
        (o.status.success(), format!("{}{}", text(&o.stdout), text(&o.stderr)))
    }
}

/// A root filesystem of a static busybox and its applets, with root in passwd and group.
fn make_rootfs(r: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "run"] {
        fs::create_dir_all(r.join(d)).expect("rootfs dirs");
    }
    fs::copy(BUSYBOX, r.join("bin/busybox")).expect("copying busybox");
    let list = Command::new(BUSYBOX).arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).expect("applet link");
    }
    fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    fs::write(r.join("etc/group"), "root:x:0:\n").expect("group");
}

/// Runs `cmd` with stdin closed and stdout and stderr in files under `out` (a
/// daemon it starts cannot hold a pipe open); kills it by PID after `limit`.
fn run_limited(cmd: &mut Command, out: &Path, limit: Duration) -> Output {
    let n = OUTPUTS.fetch_add(1, Ordering::Relaxed);
    let (so, se) = (out.join(format!("{n}.out")), out.join(format!("{n}.err")));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&so).expect("stdout file"))
        .stderr(File::create(&se).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting") {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}; killed it (pid {})", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |p: &Path| {
        let b = fs::read(p).unwrap_or_default();
        let _ = fs::remove_file(p);
        b
    };
    Output { status, stdout: read(&so), stderr: read(&se) }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Processes that belong to these podmans: conmon and cleanup processes (their
/// command lines name the podman dirs) and container processes (their root is a
/// rootfs under them). (pid, command line).
fn leftover_processes(dirs: &[PathBuf]) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default();
        let root = fs::read_link(e.path().join("root")).unwrap_or_default();
        let zombie = fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')));
        let ours = dirs.iter().any(|d| cmdline.contains(&*d.to_string_lossy()) || root.starts_with(d));
        if ours && !zombie {
            found.push((pid, cmdline.trim().to_string()));
        }
    }
    found
}

/// The cgroup directories of process `pid` named for container `id` (podman's own).
fn cgroups_of(pid: &str, id: &str) -> Vec<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        let path = path.trim_start_matches('/');
        if !path.contains(id) {
            continue;
        }
        let hierarchy = if ctrls.is_empty() {
            "unified".to_string()
        } else {
            ctrls.split(',').next().unwrap_or(ctrls).trim_start_matches("name=").to_string()
        };
        let base = Path::new("/sys/fs/cgroup");
        // cgroup v2 alone is mounted on /sys/fs/cgroup itself.
        let dir = if base.join("cgroup.controllers").exists() { base.join(path) } else { base.join(hierarchy).join(path) };
        if dir.is_dir() {
            out.push(dir);
        }
    }
    out
}

/// Mount points at or under any of `dirs`, deepest first.
fn mounts_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Removes the podmans' containers and state, also when the test fails. Drop it
/// before the lab: it needs the routers for the containers' DEL.
struct Podmen {
    hosts: Vec<Podman>,
    /// Network namespaces podman made for our containers (`/run/netns/cni-...`).
    netns: Vec<PathBuf>,
    /// Full IDs of our containers.
    ids: Vec<String>,
    /// The cgroups of our containers' processes (v1: one per hierarchy; v2: one), under /sys/fs/cgroup.
    cgroups: Vec<PathBuf>,
    done: bool,
}

impl Podmen {
    /// Removes every container and the podman dirs; returns what it had to
    /// clean up by force or could not (empty when `podman rm` did it all).
    fn cleanup(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut problems = Vec::new();
        for p in &self.hosts {
            let o = p.run(&["rm", "-f", "-a", "-t0"]);
            if !o.status.success() {
                problems.push(format!("podman rm -f -a on host {} failed: {}", p.host, text(&o.stderr)));
            }
        }
        let dirs: Vec<PathBuf> = self.hosts.iter().map(|p| p.dir.clone()).collect();
        // `podman rm -f` waits for the container's processes; conmon may take a moment to exit.
        wait_for(Duration::from_secs(5), || leftover_processes(&dirs).is_empty());
        for (pid, cmd) in leftover_processes(&dirs) {
            problems.push(format!("process {pid} survived podman rm: {cmd}; killing it"));
            // SAFETY: plain syscall; the PID was just seen running with our dirs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for ns in &self.netns {
            if ns.exists() {
                problems.push(format!("podman left the network namespace {}", ns.display()));
                if let Some(name) = ns.file_name().and_then(|n| n.to_str()) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        for id in &self.ids {
            let cache = PathBuf::from(format!("/var/lib/cni/results/weft-{id}-eth0"));
            if cache.exists() {
                problems.push(format!("podman left the CNI result cache {}", cache.display()));
                let _ = fs::remove_file(&cache);
            }
        }
        for cg in &self.cgroups {
            if cg.exists() {
                problems.push(format!("podman left the cgroup {}", cg.display()));
                let _ = fs::remove_dir(cg);
            }
        }
        for m in mounts_under(&dirs) {
            problems.push(format!("podman left a mount on {}", m.display()));
            let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).expect("mount path");
            // SAFETY: plain syscall with a valid C string; detaching a mount under our own dir.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        for d in &dirs {
            if let Err(e) = fs::remove_dir_all(d) {
                problems.push(format!("removing {}: {e}", d.display()));
            }
        }
        problems
    }
}

impl Drop for Podmen {
    fn drop(&mut self) {
        for p in self.cleanup() {
            eprintln!("podman test cleanup: {p}");
        }
    }
}

/// The name and address in busybox nslookup's answer section, if there is one.
fn answer(out: &str) -> Option<(String, String)> {
    let (_, after) = out.split_once("Name:")?;
    let mut lines = after.lines();
    let name = lines.next()?.trim().to_string();
    let addr = lines.find_map(|l| l.trim().strip_prefix("Address:").map(|a| a.trim().to_string()))?;
    Some((name, addr))
}

#[test]
fn podman_containers_on_two_hosts_reach_and_resolve_each_other() {
    const TEST: &str = "podman_containers_on_two_hosts_reach_and_resolve_each_other";
    for (tool, package) in [("podman", "podman"), ("runc", "runc")] {
        if !in_path(tool) {
            eprintln!("skipping {TEST}: {tool} not installed (apt-get install {package})");
            return;
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        eprintln!("skipping {TEST}: {BUSYBOX} not installed (apt-get install busybox-static)");
        return;
    }
    let Some(lab) = lab(TEST, 2, &[]) else { return };
    // Declared after the lab, so dropped (containers removed) while the routers still run.
    let mut pods = Podmen { hosts: vec![Podman::new(&lab, 0), Podman::new(&lab, 1)], netns: Vec::new(), ids: Vec::new(), cgroups: Vec::new(), done: false };

    // One container on each host.
    let mut ips = Vec::new();
    for (i, name) in [(0, "web-a"), (1, "web-b")] {
        let p = pods.hosts[i].clone();
        let rootfs = p.rootfs();
        let t0 = Instant::now();
        let id = p.ok(&["run", "-d", "--name", name, "--network", "weft", "--cap-add", "NET_RAW", "--rootfs", &rootfs.to_string_lossy(), "sleep", "600"]);
        eprintln!("podman run {name} on host {i}: {:?}", t0.elapsed());
        let full = p.inspect(name, "{{.Id}}");
        assert_eq!(id, full, "podman run printed another ID than inspect");
        pods.cgroups.extend(cgroups_of(&p.inspect(name, "{{.State.Pid}}"), &full));
        pods.ids.push(full);
        let sandbox = p.inspect(name, "{{.NetworkSettings.SandboxKey}}");
        if !sandbox.is_empty() {
            pods.netns.push(PathBuf::from(sandbox));
        }
        let ip = p.inspect(name, "{{.NetworkSettings.Networks.weft.IPAddress}}");
        let octets: Vec<u8> = ip.split('.').filter_map(|o| o.parse().ok()).collect();
        // weft's default range: 10.32.0.0/12.
        assert!(octets.len() == 4 && octets[0] == 10 && (32..48).contains(&octets[1]), "{name} got {ip:?}, not an address in 10.32.0.0/12");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1], "both containers got the same address");
    let (a, b) = (pods.hosts[0].clone(), pods.hosts[1].clone());
    let (ip_a, ip_b) = (ips[0].clone(), ips[1].clone());
    let (id_b, netns_b) = (pods.ids[1].clone(), pods.netns.get(1).cloned());

    // Across the hosts, through weft, both ways.
    let ping = |p: &Podman, name: &str, ip: &str| wait_for(Duration::from_secs(10), || p.exec(name, &["ping", "-c1", "-W1", ip]).0);
    assert!(ping(&a, "web-a", &ip_b), "web-a ({ip_a}) on host 0 cannot ping web-b ({ip_b}) on host 1: {}", a.exec("web-a", &["ping", "-c1", "-W1", &ip_b]).1);
    assert!(ping(&b, "web-b", &ip_a), "web-b ({ip_b}) cannot ping web-a ({ip_a}): {}", b.exec("web-b", &["ping", "-c1", "-W1", &ip_a]).1);

    // podman wrote the result's DNS into resolv.conf: weft DNS first, the search domain weft.local.
    let mut servers = Vec::new();
    for (p, name) in [(&a, "web-a"), (&b, "web-b")] {
        let (ok, conf) = p.exec(name, &["cat", "/etc/resolv.conf"]);
        assert!(ok && conf.contains("weft.local"), "{name}'s resolv.conf lacks weft.local:\n{conf}");
        let first = conf.lines().find_map(|l| l.strip_prefix("nameserver ")).map(|s| s.trim().to_string());
        let server = first.unwrap_or_else(|| panic!("{name}'s resolv.conf has no nameserver:\n{conf}"));
        let dns = lab.weft_json(p.host, &["status", "dns"]).expect("weft status dns");
        let listening = dns["listening"].as_array().is_some_and(|l| l.iter().any(|a| a.as_str() == Some(&format!("{server}:53"))));
        assert!(listening, "{name}'s first nameserver {server} is not weft DNS on host {}: {}", p.host, dns["listening"]);
        if p.host == 0 {
            eprintln!("{name}'s /etc/resolv.conf:\n{conf}");
        }
        servers.push(server);
    }

    // Names, both ways (-type=a: busybox nslookup fails when the AAAA query is refused). The
    // FQDN is asked of weft DNS explicitly: resolv.conf also lists the host's own nameserver,
    // which is not meant to be asked. The short name goes through resolv.conf: busybox nslookup
    // asks the first nameserver, weft's, and moves on only when it does not answer, and the
    // answer must name web-b.weft.local, so the search domain podman wrote is what made it work.
    let resolves = |p: &Podman, name: &str, query: &[&str], want: (&str, &str)| {
        let mut args = vec!["nslookup", "-type=a"];
        args.extend_from_slice(query);
        let mut last = String::new();
        let ok = wait_for(Duration::from_secs(10), || {
            last = p.exec(name, &args).1;
            answer(&last).is_some_and(|(n, ip)| n == want.0 && ip == want.1)
        });
        assert!(ok, "{name}: `{}` does not answer {want:?}:\n{last}", args.join(" "));
    };
    resolves(&a, "web-a", &["web-b.weft.local", &servers[0]], ("web-b.weft.local", &ip_b));
    resolves(&b, "web-b", &["web-a.weft.local", &servers[1]], ("web-a.weft.local", &ip_a));
    resolves(&a, "web-a", &["web-b"], ("web-b.weft.local", &ip_b));
    resolves(&b, "web-b", &["web-a"], ("web-a.weft.local", &ip_a));

    // weft status on host 1 shows web-b's attachment under podman's container ID.
    let st = lab.weft_json(1, &["status"]).expect("weft status");
    let cni = st["cni"].as_array().unwrap_or_else(|| panic!("no cni attachments in weft status: {st}"));
    let mine: Vec<&Value> = cni.iter().filter(|c| c["container_id"] == id_b.as_str()).collect();
    assert_eq!(mine.len(), 1, "{cni:?}");
    assert_eq!(mine[0]["network"], "weft");
    assert_eq!(mine[0]["ifname"], "eth0");
    // The names: the container's (CNI_ARGS K8S_POD_NAME) and the alias podman passes for the
    // network in runtimeConfig.aliases, the short ID (which podman's own DNS answers too).
    let mut names: Vec<&str> = mine[0]["names"].as_array().map(|n| n.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    names.sort_unstable();
    let mut want = vec!["web-b", &id_b[..12]];
    want.sort_unstable();
    assert_eq!(names, want, "{}", mine[0]);
    assert!(mine[0]["addresses"].to_string().contains(&format!("\"{ip_b}/")), "{}", mine[0]);
    let prefix = format!("cni:weft:{id_b}:eth0");
    assert!(allocations(&lab, 1).iter().any(|(id, addr)| id.starts_with(&prefix) && addr.starts_with(&format!("{ip_b}/"))), "{:?}", allocations(&lab, 1));

    // podman rm: DEL removes the veth pair and gives web-b's address and name back.
    let veths = || links(&lab, &b.ns).into_iter().filter(|l| l.starts_with("vw")).collect::<Vec<_>>();
    assert_eq!(veths().len(), 1, "host 1 should have web-b's veth on the bridge: {:?}", veths());
    let t0 = Instant::now();
    b.ok(&["rm", "-f", "-t0", "web-b"]);
    eprintln!("podman rm -f -t0 web-b on host 1: {:?}", t0.elapsed());
    assert!(!allocations(&lab, 1).iter().any(|(id, _)| id.starts_with(&prefix)), "web-b's allocation stayed: {:?}", allocations(&lab, 1));
    assert!(veths().is_empty(), "web-b's veth stayed on host 1: {:?}", veths());
    let st = lab.weft_json(1, &["status"]).expect("weft status");
    assert!(!st["cni"].to_string().contains(&id_b), "web-b's attachment stayed: {}", st["cni"]);
    if let Some(ns) = netns_b {
        assert!(!ns.exists(), "podman left web-b's namespace {}", ns.display());
    }
    let mut last = String::new();
    let gone = wait_for(Duration::from_secs(10), || {
        last = a.exec("web-a", &["nslookup", "-type=a", "web-b.weft.local", &servers[0]]).1;
        // An answer that the name does not exist, not just no answer.
        answer(&last).is_none() && last.contains("NXDOMAIN")
    });
    assert!(gone, "web-b.weft.local still resolves after podman rm:\n{last}");

    // Everything goes with podman rm; nothing needed removing by force.
    let dirs: Vec<PathBuf> = pods.hosts.iter().map(|p| p.dir.clone()).collect();
    let t0 = Instant::now();
    let problems = pods.cleanup();
    eprintln!("cleanup (podman rm -f -a on both hosts, dirs removed): {:?}", t0.elapsed());
    assert!(problems.is_empty(), "cleanup: {problems:#?}");
    assert!(leftover_processes(&dirs).is_empty());
    assert!(!allocations(&lab, 0).iter().any(|(id, _)| id.starts_with("cni:")), "web-a's allocation stayed: {:?}", allocations(&lab, 0));
}
