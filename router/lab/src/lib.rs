//! A multi-host test lab for weft on one Linux machine.
//!
//! [`Lab::new`] builds a small data centre out of network namespaces: one *switch* namespace
//! holding a Linux bridge (`br0`), and `hosts` *host* namespaces, each joined to the bridge by a
//! veth pair (`ul0` in the host, underlay address `192.168.77.<i+1>/24`; `s<i>` on the switch).
//! [`Lab::start_router`] runs `weft router` in a host namespace as a child process (its log goes to
//! `/tmp/weft-lab-<id>/h<i>/router.log`), [`Lab::add_container`] makes a "container" namespace and
//! has that host's router attach it, [`Lab::block`] cuts the underlay between two hosts with an
//! nftables rule on the switch ([`Lab::block_udp`] only their UDP datagrams to one port). Dropping
//! the [`Lab`] stops the routers and deletes everything it made; [`cleanup_stale`] removes what a
//! crashed run left behind. [`demo`] is `weft lab demo`.
//!
//! [`nat`] puts hosts behind NAT routers of a [`Nat`] kind ([`LabConfig::behind_nat`]): a NAT
//! router namespace `<id>-n<i>` between the switch and host `i`, which then has a private
//! `underlay_ip` (`10.200.<i>.2`) and the NAT's outside address as [`Host::public_ip`].
//!
//! [`docker`] runs one `dockerd` per lab host ([`docker::Dockerd`], in the host's network
//! namespace and a private mount namespace), for the Docker plugin tests; drop it before the lab.
//!
//! [`probe`] has what the demo checks with, done by weft itself from inside a namespace (on a
//! thread that enters it): an ICMP echo ([`probe::icmp_echo`]) and a DNS A query
//! ([`probe::dns_query_a`]), so the lab needs no `ping` or `dig`.
//!
//! What it needs: root, and `ip` (Debian package iproute2) and `nsenter` (util-linux) in PATH;
//! [`Lab::new`] checks for them and names the package to install. [`Lab::block`] and
//! [`Lab::block_udp`] also need `nft` (nftables) and check for it. Tests that run real tools in
//! the lab's namespaces with [`Lab::exec`] (`ping`, `dig`, `iperf3`, ...) need those too;
//! [`require_lab`] skips them with a message when something is missing.
//!
//! Names: every lab has an id `wl<pid>x<n>` (creator PID, per-process counter); its namespaces are
//! `<id>-sw`, `<id>-h<i>`, `<id>-n<i>` (NAT routers) and `<id>-<container>`. Commands run in a
//! namespace with `nsenter --net=/run/netns/<ns>` (not `ip netns exec`, whose private mount
//! namespace would hide namespaces created later).
//!
//! Left out: only network namespaces are used (containers share the machine's mount, PID and user
//! namespaces and its filesystem); no impairment beyond a full block or a dropped UDP port (the
//! kernel here has no netem); IPv4 underlay only; one flat L2 underlay (apart from hosts behind
//! NAT routers, no routed hosts). Everything needs root.
//! Traffic only flows between the lab's own namespaces: [`Lab::exec`] refuses other namespaces.
//!
//! A test:
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use weft_lab::{Lab, LabConfig};
//! if !weft_lab::require_lab("two_hosts", &[]) {
//!     return Ok(());
//! }
//! weft_lab::cleanup_stale()?; // what crashed runs left behind
//! let mut lab = Lab::new(LabConfig::new(2, weft_lab::find_weft_bin()?))?;
//! lab.start_router(0, &[])?;
//! lab.start_router(1, &[0])?;
//! lab.wait_established(1, 1, Duration::from_secs(20))?;
//! let a = lab.add_container(0, "a", "10.50.0.1/24")?;
//! let b = lab.add_container(1, "b", "10.50.0.2/24")?;
//! let rtt = weft_lab::probe::icmp_echo(&lab.netns_path(&a.ns)?, b.ip, Duration::from_secs(2))?;
//! println!("a -> b: {rtt:?}");
//! // Real tools run in a namespace with `exec` (this one needs iputils-ping installed):
//! assert!(lab.exec(&a.ns, &["ping", "-c1", "-W2", &b.ip.to_string()])?.status.success());
//! # Ok(()) }
//! ```

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

pub mod docker;
pub mod nat;
pub mod probe;

pub use nat::Nat;

const NETNS_DIR: &str = "/run/netns";
/// The tools every lab needs in PATH (see [`debian_package`]): `nft` because routers guard each
/// container port with it (and [`Lab::block`] cuts links with it).
const LAB_TOOLS: [&str; 3] = ["ip", "nsenter", "nft"];
/// Limit for `ip`, `nft` and `weft` client commands.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started router has to answer its API.
const ROUTER_READY: Duration = Duration::from_secs(30);
/// Limit for [`Lab::exec`] commands (long enough for an iperf3 run).
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long routers get between SIGTERM and SIGKILL on teardown.
const TERM_GRACE: Duration = Duration::from_secs(2);
static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Serialises `ip netns add` within this process: concurrent first use of /run/netns can stack mounts.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// What to build. `LabConfig::new(hosts, weft_bin)` fills in the rest with defaults.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of host namespaces (1..=250).
    pub hosts: usize,
    /// The `weft` binary used for routers and client commands.
    pub weft_bin: PathBuf,
    /// Passed as `--password` to every router.
    pub password: Option<String>,
    /// Extra router arguments (e.g. `--no-discovery`), placed before the peer addresses.
    pub router_args: Vec<String>,
    /// Environment variables set for every router (e.g. `WEFT_REKEY_INTERVAL_MS`).
    pub router_env: Vec<(String, String)>,
    /// Leave namespaces, routers and the temp dir in place when the lab is dropped (for inspection;
    /// a later [`cleanup_stale`] removes them once this process has exited).
    pub keep: bool,
    /// Hosts behind a NAT router: (host index, kind), each host at most once; see [`nat`] and
    /// [`LabConfig::behind_nat`]. Empty: every host sits on the switch.
    pub nat: Vec<(usize, Nat)>,
    /// Hosts whose underlay is not IPv4 only: (host index, stack); see [`Stack`].
    pub stacks: Vec<(usize, Stack)>,
}

/// The address families of a host's underlay link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// `192.168.77.<i+1>/24` only (the default).
    V4,
    /// `fd77::<i+1>/64` only; its router listens on `[::]:6783`.
    V6,
    /// Both; its router listens on `[::]:6783` (dual-stack).
    Dual,
}

impl Stack {
    fn v4(self) -> bool {
        self != Stack::V6
    }

    fn v6(self) -> bool {
        self != Stack::V4
    }
}

impl LabConfig {
    /// `hosts` hosts using `weft_bin`, no password, no extra arguments, cleaned up on drop.
    pub fn new(hosts: usize, weft_bin: impl Into<PathBuf>) -> LabConfig {
        LabConfig {
            hosts,
            weft_bin: weft_bin.into(),
            password: None,
            router_args: Vec::new(),
            router_env: Vec::new(),
            keep: false,
            nat: Vec::new(),
            stacks: Vec::new(),
        }
    }
}

/// One simulated machine: a network namespace on the underlay switch, maybe running a router.
#[derive(Debug)]
pub struct Host {
    /// Position in [`Lab::hosts`].
    pub index: usize,
    /// Network namespace name (`/run/netns/<ns>`).
    pub ns: String,
    /// Address of `ul0`, `192.168.77.<index+1>`; behind a NAT the private `10.200.<index>.2`
    /// (see [`nat`]).
    pub underlay_ip: Ipv4Addr,
    /// The address other hosts see this one as: `underlay_ip`, or behind a NAT the NAT
    /// router's outside address `192.168.77.<index+1>`.
    pub public_ip: Ipv4Addr,
    /// The underlay's address families ([`Stack::V6`]: `underlay_ip` is not configured).
    pub stack: Stack,
    /// Its IPv6 underlay address, `fd77::<index+1>`, unless [`Stack::V4`].
    pub underlay_v6: Option<std::net::Ipv6Addr>,
    /// The kind of NAT this host sits behind, if any.
    pub nat: Option<Nat>,
    /// The NAT router's namespace (`<id>-n<index>`), if behind a NAT.
    pub nat_ns: Option<String>,
    /// The router's API socket (`--api-socket`).
    pub api_socket: PathBuf,
    /// The router's `--state-dir`.
    pub state_dir: PathBuf,
    /// The router's stdout+stderr (appended across restarts).
    pub log: PathBuf,
    router: Option<Child>,
    /// Per-host password, overriding [`LabConfig::password`] (`Some(None)`: no password).
    password: Option<Option<String>>,
    /// Per-host arguments added after [`LabConfig::router_args`].
    extra_args: Vec<String>,
}

impl Host {
    /// PID of the running router child, if one was started and not yet killed.
    pub fn router_pid(&self) -> Option<u32> {
        self.router.as_ref().map(Child::id)
    }
}

/// A container namespace attached to a host's router.
#[derive(Debug, Clone)]
pub struct Container {
    /// Network namespace name; use it with [`Lab::exec`].
    pub ns: String,
    /// Index of the host whose router attached it.
    pub host: usize,
    /// The address given to `weft attach`.
    pub ip: Ipv4Addr,
}

/// A running lab; see the crate docs. Dropping it cleans up unless [`LabConfig::keep`].
#[derive(Debug)]
pub struct Lab {
    id: String,
    dir: PathBuf,
    cfg: LabConfig,
    switch: String,
    hosts: Vec<Host>,
    /// Every namespace this lab made, in creation order.
    namespaces: Vec<String>,
    blocked: BTreeSet<(usize, usize)>,
    /// Host pairs (lower index first) and UDP destination ports blocked with [`Lab::block_udp`].
    blocked_udp: BTreeSet<(usize, usize, u16)>,
    nft_ready: bool,
}

impl Lab {
    /// Creates the switch and host namespaces and the underlay. Does not start routers.
    /// On failure everything made so far is removed again. Fails first, before making anything,
    /// if `ip` or `nsenter` is not in PATH (naming the Debian package) or if not root.
    pub fn new(cfg: LabConfig) -> Result<Lab> {
        if !(1..=250).contains(&cfg.hosts) {
            bail!("a lab needs 1 to 250 hosts, not {}", cfg.hosts);
        }
        nat::check_config(&cfg)?;
        // Tools before root: this check makes nothing and needs no privilege, so it can be
        // tested (and a user can learn what to install) without root.
        for tool in LAB_TOOLS {
            need_tool(tool, "the lab")?;
        }
        if !is_root() {
            bail!("the lab needs root: it creates network namespaces (run it with sudo)");
        }
        let id = fresh_id();
        let dir = PathBuf::from(format!("/tmp/weft-lab-{id}"));
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create lab directory {}", dir.display()))?;
        let mut lab = Lab {
            switch: format!("{id}-sw"),
            id,
            dir,
            cfg,
            hosts: Vec::new(),
            namespaces: Vec::new(),
            blocked: BTreeSet::new(),
            blocked_udp: BTreeSet::new(),
            nft_ready: false,
        };
        if let Err(e) = lab.build() {
            lab.cfg.keep = false; // a half-built lab is never kept
            return Err(e.context(format!(
                "building lab {} failed (it was cleaned up again)",
                lab.id
            )));
        }
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.switch.clone();
        self.add_netns(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..self.cfg.hosts {
            let ns = format!("{}-h{i}", self.id);
            let (underlay_ip, public_ip, nat_ns) = match self.cfg.nat_of(i) {
                Some(kind) => {
                    let nat_ns = format!("{}-n{i}", self.id);
                    let (private, outside) = self.build_nat_host(i, kind, &nat_ns, &ns)?;
                    (private, outside, Some(nat_ns))
                }
                None => {
                    let underlay_ip = self.build_host(i, &ns)?;
                    (underlay_ip, underlay_ip, None)
                }
            };
            let hdir = self.dir.join(format!("h{i}"));
            let state_dir = hdir.join("state");
            fs::create_dir_all(&state_dir)
                .with_context(|| format!("cannot create {}", state_dir.display()))?;
            let stack = self.cfg.stack_of(i);
            let underlay_v6 = stack.v6().then(|| std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, i as u16 + 1));
            self.hosts.push(Host {
                index: i,
                ns,
                underlay_ip,
                public_ip,
                stack,
                underlay_v6,
                nat: self.cfg.nat_of(i),
                nat_ns,
                api_socket: hdir.join("weft.sock"),
                state_dir,
                log: hdir.join("router.log"),
                router: None,
                password: None,
                extra_args: Vec::new(),
            });
        }
        Ok(())
    }

    /// Creates host `i`'s namespace `ns` on the switch (port `s<i>`, `ul0` with
    /// `192.168.77.<i+1>/24`); returns that address.
    fn build_host(&mut self, i: usize, ns: &str) -> Result<Ipv4Addr> {
        let sw = self.switch.clone();
        self.add_netns(ns)?;
        let port = format!("s{i}");
        ip(&[
            "link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", "ul0", "netns",
            ns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        let underlay_ip = Ipv4Addr::new(192, 168, 77, i as u8 + 1);
        let stack = self.cfg.stack_of(i);
        if stack.v4() {
            ip(&["-n", ns, "addr", "add", &format!("{underlay_ip}/24"), "dev", "ul0"])?;
        }
        if stack.v6() {
            // No duplicate address detection: the address is usable at once.
            let v6 = std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, i as u16 + 1);
            ip(&["-n", ns, "addr", "add", &format!("{v6}/64"), "dev", "ul0", "nodad"])?;
        }
        ip(&["-n", ns, "link", "set", "ul0", "up"])?;
        Ok(underlay_ip)
    }

    /// Creates namespace `name` with `lo` up and records it for cleanup.
    fn add_netns(&mut self, name: &str) -> Result<()> {
        if Path::new(NETNS_DIR).join(name).exists() {
            bail!("network namespace {name} already exists (pick another name, or remove it with `ip netns del {name}`)");
        }
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            ip(&["netns", "add", name])?;
        }
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The lab id (`wl<pid>x<n>`), the prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lab's temp dir, `/tmp/weft-lab-<id>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Host `i`. Panics if `i` is out of range.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// All hosts, in index order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Name of the switch namespace (bridge `br0`, ports `s<i>`).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    fn checked_host(&self, i: usize) -> Result<&Host> {
        self.hosts.get(i).ok_or_else(|| {
            anyhow!(
                "lab {} has no host {i} (it has {})",
                self.id,
                self.hosts.len()
            )
        })
    }

    /// Gives host `i` its own password (`None`: run without one) and extra router
    /// arguments, for the routers it starts from now on.
    pub fn configure_host(&mut self, i: usize, password: Option<&str>, extra_args: &[&str]) -> Result<()> {
        self.checked_host(i)?;
        let h = &mut self.hosts[i];
        h.password = Some(password.map(str::to_string));
        h.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Starts `weft router` on host `i`, with the underlay IPs of hosts `peers` as PEER arguments.
    /// A host behind a NAT has a private underlay IP nobody else can reach: name only public
    /// hosts as peers (see [`nat`]).
    /// Returns once its API answers. Fails if a router is already running there, or if it exits
    /// before its API answers, or that takes over 30 s.
    pub fn start_router(&mut self, i: usize, peers: &[usize]) -> Result<()> {
        let me = self.checked_host(i)?.stack;
        // Each peer by an address family both hosts have, IPv4 first.
        let peer_ips = peers
            .iter()
            .map(|&p| {
                let h = self.checked_host(p)?;
                match (h.underlay_v6, me.v4() && h.stack.v4()) {
                    (_, true) => Ok(h.underlay_ip.to_string()),
                    (Some(v6), false) if me.v6() => Ok(format!("[{v6}]:6783")),
                    _ => Err(anyhow!("hosts {i} and {p} share no address family")),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if !self.cfg.weft_bin.is_file() {
            bail!(
                "weft binary {} not found (build it with `cargo build -p weft`)",
                self.cfg.weft_bin.display()
            );
        }
        let host = &mut self.hosts[i];
        if let Some(child) = host.router.as_mut() {
            if child.try_wait()?.is_none() {
                bail!(
                    "a router is already running on host {i} (pid {}); kill_router it first",
                    child.id()
                );
            }
        }
        let mut cmd = nsenter(&host.ns);
        cmd.arg(&self.cfg.weft_bin).arg("router");
        cmd.arg("--state-dir").arg(&host.state_dir);
        cmd.arg("--api-socket").arg(&host.api_socket);
        cmd.arg("--nickname").arg(format!("h{i}"));
        let pw = match &host.password {
            Some(p) => p.as_ref(),
            None => self.cfg.password.as_ref(),
        };
        if let Some(pw) = pw {
            cmd.arg("--password").arg(pw);
        }
        cmd.args(&self.cfg.router_args).args(&host.extra_args);
        if host.stack != Stack::V4 && !self.cfg.router_args.iter().chain(&host.extra_args).any(|a| a.starts_with("--listen")) {
            cmd.args(["--listen", "[::]:6783"]);
        }
        // Every lab host takes part in starting the address ring, unless told otherwise.
        let n_hosts = self.hosts.len();
        let host = &mut self.hosts[i];
        if !self.cfg.router_args.iter().chain(&host.extra_args).any(|a| a.starts_with("--ipalloc-init")) {
            cmd.arg(format!("--ipalloc-init=consensus={n_hosts}"));
        }
        // Docker's plugin directory and socket are the machine's: a lab host uses Docker only
        // when it is given its own (see `docker::Dockerd::router_args`).
        if !self.cfg.router_args.iter().chain(&host.extra_args).any(|a| a.starts_with("--docker")) {
            cmd.arg("--no-docker");
        }
        cmd.args(&peer_ips);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(self.cfg.router_env.iter().map(|(k, v)| (k, v)));
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)
            .with_context(|| format!("cannot open router log {}", host.log.display()))?;
        {
            use std::io::Write;
            writeln!(log, "=== weft-lab: starting `{}`", describe(&cmd))?;
        }
        let err_log = log.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(err_log);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        thread::sleep(Duration::from_millis(100));
        if let Some(status) = child.try_wait()? {
            bail!(
                "router on host {i} exited at once ({status}); last lines of {}:\n{}",
                host.log.display(),
                tail(&host.log, 30)
            );
        }
        host.router = Some(child);
        self.wait_api(i)
    }

    /// Waits until host `i`'s router answers `weft status`, as `weft launch` does: it stretches
    /// the password (Argon2id, a fraction of a second) and makes its devices before its API is up.
    /// Fails with the log's tail if the router exits first or does not answer within 30 s.
    fn wait_api(&mut self, i: usize) -> Result<()> {
        let t0 = std::time::Instant::now();
        loop {
            if self.weft(i, &["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            let host = &mut self.hosts[i];
            let exited = match host.router.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                host.router = None;
                bail!("router on host {i} exited during start-up ({status}); last lines of {}:\n{}", host.log.display(), tail(&host.log, 30));
            }
            if t0.elapsed() > ROUTER_READY {
                bail!("router on host {i} did not answer `weft status` within {ROUTER_READY:?}; last lines of {}:\n{}", host.log.display(), tail(&host.log, 30));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGKILL`) to host `i`'s router by PID and
    /// waits up to 10 s for it to exit. Errors if no router runs there or it does not exit.
    pub fn kill_router(&mut self, i: usize, signal: i32) -> Result<()> {
        self.checked_host(i)?;
        let host = &mut self.hosts[i];
        let child = host
            .router
            .as_mut()
            .ok_or_else(|| anyhow!("no router running on host {i}"))?;
        let pid = child.id();
        if child.try_wait()?.is_none() {
            // SAFETY: plain syscall on our own child's PID (not yet reaped, so not reused).
            if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
                bail!(
                    "kill({pid}, {signal}) for the router on host {i} failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        if wait_timeout(child, Duration::from_secs(10))?.is_none() {
            bail!("router on host {i} (pid {pid}) did not exit within 10 s of signal {signal}");
        }
        host.router = None;
        Ok(())
    }

    /// Runs `weft --api-socket <sock> <args>` in host `i`'s namespace; returns its output whatever
    /// the exit status (killed after 30 s).
    pub fn weft(&self, i: usize, args: &[&str]) -> Result<Output> {
        let h = self.checked_host(i)?;
        let mut cmd = nsenter(&h.ns);
        cmd.arg(&self.cfg.weft_bin)
            .arg("--api-socket")
            .arg(&h.api_socket)
            .args(args);
        run(&mut cmd, CMD_TIMEOUT)
    }

    /// Like [`Lab::weft`] with `--json` appended; fails unless it exits 0 and prints JSON.
    pub fn weft_json(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.weft(i, &all)?;
        let shown = all.join(" ");
        if !out.status.success() {
            bail!(
                "`weft {shown}` on host {i} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`weft {shown}` on host {i} did not print JSON: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
    }

    /// Polls `weft status --json` on host `i` until at least `n` connections are `established`.
    /// On timeout (or if the router dies) the error has the last status and the router log's tail.
    pub fn wait_established(&self, i: usize, n: usize, timeout: Duration) -> Result<()> {
        let host = self.checked_host(i)?;
        let pid = host
            .router_pid()
            .ok_or_else(|| anyhow!("no router running on host {i}; start_router first"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let (count, last) = match self.weft_json(i, &["status"]) {
                Ok(v) => (count_established(&v), summarize_status(&v)),
                Err(e) => (0, format!("{e:#}")),
            };
            if count >= n {
                return Ok(());
            }
            let why = if !pid_running(pid) {
                format!("router on host {i} (pid {pid}) exited")
            } else if Instant::now() >= deadline {
                format!("host {i}: {count} of {n} connections established after {timeout:?}")
            } else {
                thread::sleep(Duration::from_millis(250));
                continue;
            };
            bail!(
                "{why}\nlast status:\n{last}\nlast lines of {}:\n{}",
                host.log.display(),
                tail(&host.log, 40)
            );
        }
    }

    /// Creates an empty namespace `<id>-<name>`, removed with the lab, for a container that
    /// something other than `weft attach` joins (a CNI plugin, a runtime). Returns its name.
    pub fn add_namespace(&mut self, name: &str) -> Result<String> {
        if name.is_empty() || name.len() > 40 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("namespace name {name:?} must be 1-40 characters of [A-Za-z0-9_-]");
        }
        let ns = format!("{}-{name}", self.id);
        self.add_netns(&ns).with_context(|| format!("creating namespace {name}"))?;
        Ok(ns)
    }

    /// Creates container namespace `<id>-<name>` and runs `weft attach <ns> <cidr>` on `host`.
    pub fn add_container(&mut self, host: usize, name: &str, cidr: &str) -> Result<Container> {
        self.checked_host(host)?;
        if name.is_empty()
            || name.len() > 40
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!("container name {name:?} must be 1-40 characters of [A-Za-z0-9_-]");
        }
        let ip: Ipv4Addr = cidr
            .split_once('/')
            .and_then(|(a, p)| {
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .and(a.parse().ok())
            })
            .ok_or_else(|| {
                anyhow!("container address {cidr:?} is not IPv4/PREFIX like 10.50.0.1/24")
            })?;
        let ns = format!("{}-{name}", self.id);
        self.add_netns(&ns)
            .with_context(|| format!("creating container {name}"))?;
        let out = self.weft(host, &["attach", &ns, cidr])?;
        if !out.status.success() {
            bail!(
                "`weft attach {ns} {cidr}` on host {host} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Container { ns, host, ip })
    }

    /// Adds container `name` on `host` with an address from weft's IPAM (`weft attach NS`
    /// without an address), and returns it with the address it got.
    pub fn add_container_auto(&mut self, host: usize, name: &str) -> Result<Container> {
        self.add_container_auto_with(host, name, &[])
    }

    /// Like [`Lab::add_container_auto`], with more `weft attach` arguments (e.g. `--name web`).
    pub fn add_container_auto_with(&mut self, host: usize, name: &str, extra: &[&str]) -> Result<Container> {
        self.checked_host(host)?;
        if name.is_empty() || name.len() > 40 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("container name {name:?} must be 1-40 characters of [A-Za-z0-9_-]");
        }
        let ns = format!("{}-{name}", self.id);
        self.add_netns(&ns).with_context(|| format!("creating container {name}"))?;
        let mut args = vec!["attach", ns.as_str()];
        args.extend_from_slice(extra);
        let v = self.weft_json(host, &args)?;
        let addr = v["addresses"][0].as_str().ok_or_else(|| anyhow!("`weft attach {ns}` gave no address: {v}"))?;
        let ip: Ipv4Addr = addr
            .split_once('/')
            .and_then(|(a, _)| a.parse().ok())
            .ok_or_else(|| anyhow!("`weft attach {ns}` gave {addr:?}, not IPv4/PREFIX"))?;
        Ok(Container { ns, host, ip })
    }

    /// Runs `cmd` in namespace `ns` (one of this lab's) via `nsenter --net=`; returns its output
    /// whatever the exit status (killed after 300 s).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<Output> {
        self.netns_path(ns)?;
        let (prog, args) = cmd
            .split_first()
            .ok_or_else(|| anyhow!("exec in {ns}: empty command"))?;
        let mut c = nsenter(ns);
        c.arg(prog).args(args);
        run(&mut c, EXEC_TIMEOUT)
    }

    /// The path of namespace `ns`, one of this lab's (`/run/netns/<ns>`), for the [`probe`]s.
    /// Errors for any other namespace: lab traffic stays between the lab's own namespaces.
    pub fn netns_path(&self, ns: &str) -> Result<PathBuf> {
        if !self.namespaces.iter().any(|n| n == ns) {
            bail!("{ns} is not a namespace of lab {} (the lab only works in its own namespaces)", self.id);
        }
        Ok(Path::new(NETNS_DIR).join(ns))
    }

    /// Drops all underlay frames between hosts `a` and `b`, both ways (nftables `bridge` table
    /// `weft_lab` in the switch namespace, matching switch ports). Blocking twice is a no-op.
    /// Needs `nft` (Debian package nftables) in PATH.
    pub fn block(&mut self, a: usize, b: usize) -> Result<()> {
        let key = self.pair(a, b)?;
        if self.blocked.contains(&key) {
            return Ok(());
        }
        need_tool("nft", "Lab::block")?;
        self.ensure_nft()?;
        self.nft(&format!(
            "add element bridge weft_lab blocked {{ \"s{a}\" . \"s{b}\", \"s{b}\" . \"s{a}\" }}"
        ))?;
        self.blocked.insert(key);
        Ok(())
    }

    /// Undoes [`Lab::block`]; a no-op if the pair is not blocked.
    pub fn unblock(&mut self, a: usize, b: usize) -> Result<()> {
        let key = self.pair(a, b)?;
        if !self.blocked.contains(&key) {
            return Ok(());
        }
        self.nft(&format!(
            "delete element bridge weft_lab blocked {{ \"s{a}\" . \"s{b}\", \"s{b}\" . \"s{a}\" }}"
        ))?;
        self.blocked.remove(&key);
        Ok(())
    }

    /// Drops only the UDP datagrams with destination port `port` between hosts `a` and `b`,
    /// both ways (set `blocked_udp` of the same nftables table as [`Lab::block`]); everything else
    /// between them still flows, e.g. to cut one UDP data path while the TCP control connection
    /// and the other UDP ports stay up. Independent of [`Lab::block`]; blocking twice is a no-op.
    /// Needs `nft` (Debian package nftables) in PATH.
    pub fn block_udp(&mut self, a: usize, b: usize, port: u16) -> Result<()> {
        let (lo, hi) = self.pair(a, b)?;
        if self.blocked_udp.contains(&(lo, hi, port)) {
            return Ok(());
        }
        need_tool("nft", "Lab::block_udp")?;
        self.ensure_nft()?;
        self.nft(&format!(
            "add element bridge weft_lab blocked_udp {{ \"s{a}\" . \"s{b}\" . {port}, \"s{b}\" . \"s{a}\" . {port} }}"
        ))?;
        self.blocked_udp.insert((lo, hi, port));
        Ok(())
    }

    /// Undoes [`Lab::block_udp`]; a no-op if that pair and port are not blocked.
    pub fn unblock_udp(&mut self, a: usize, b: usize, port: u16) -> Result<()> {
        let (lo, hi) = self.pair(a, b)?;
        if !self.blocked_udp.contains(&(lo, hi, port)) {
            return Ok(());
        }
        self.nft(&format!(
            "delete element bridge weft_lab blocked_udp {{ \"s{a}\" . \"s{b}\" . {port}, \"s{b}\" . \"s{a}\" . {port} }}"
        ))?;
        self.blocked_udp.remove(&(lo, hi, port));
        Ok(())
    }

    fn pair(&self, a: usize, b: usize) -> Result<(usize, usize)> {
        self.checked_host(a)?;
        self.checked_host(b)?;
        if a == b {
            bail!("cannot block host {a} from itself");
        }
        Ok((a.min(b), a.max(b)))
    }

    /// Makes the `weft_lab` table once: set `blocked` (switch port pairs, [`Lab::block`]) and set
    /// `blocked_udp` (port pairs and a UDP destination port, [`Lab::block_udp`]), each with a drop
    /// rule in the bridge's forward hook. (`udp dport` implies a `meta l4proto udp` check; of a
    /// fragmented datagram only the first fragment carries the port and is dropped, which is
    /// enough to lose the datagram.)
    fn ensure_nft(&mut self) -> Result<()> {
        if !self.nft_ready {
            self.nft(
                "add table bridge weft_lab; \
                 add set bridge weft_lab blocked { type ifname . ifname; }; \
                 add set bridge weft_lab blocked_udp { type ifname . ifname . inet_service; }; \
                 add chain bridge weft_lab forward { type filter hook forward priority 0; policy accept; }; \
                 add rule bridge weft_lab forward iifname . oifname @blocked drop; \
                 add rule bridge weft_lab forward iifname . oifname . udp dport @blocked_udp drop",
            )?;
            self.nft_ready = true;
        }
        Ok(())
    }

    fn nft(&self, rule: &str) -> Result<()> {
        let mut c = nsenter(&self.switch);
        c.arg("nft").arg(rule);
        checked(&mut c).context("nftables in the switch namespace")
    }

    /// Stops routers (SIGTERM, SIGKILL after 2 s), kills leftover processes in the lab's
    /// namespaces, deletes them and the temp dir. Returns what went wrong, if anything.
    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for h in &mut self.hosts {
            if let Some(mut child) = h.router.take() {
                if let Err(e) = stop_child(&mut child, TERM_GRACE) {
                    errors.push(format!("stopping router on host {}: {e:#}", h.index));
                }
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = remove_netns(&ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.cfg.keep {
            return;
        }
        for e in self.teardown() {
            eprintln!("weft-lab {}: cleanup: {e}", self.id);
        }
    }
}

/// For tests: polls `cond` every 200 ms until it holds or `timeout` passes; returns whether it
/// held (asked once more at the end).
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    cond()
}

/// Whether this process runs as root (effective UID 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests: `true` when a lab test can run: root, the tools every lab needs (`ip`, `nsenter`)
/// and `tools` (what the test itself runs, e.g. `nft` for [`Lab::block`], `ping` or `dig` for
/// [`Lab::exec`]) in PATH. Otherwise prints `skipping <test>: ...` naming what is missing and its
/// Debian package, and returns `false`.
pub fn require_lab(test: &str, tools: &[&str]) -> bool {
    if !is_root() {
        eprintln!("skipping {test}: needs root (lab tests create network namespaces)");
        return false;
    }
    for tool in LAB_TOOLS.iter().chain(tools) {
        if !in_path(tool) {
            let pkg = debian_package(tool);
            eprintln!("skipping {test}: `{tool}` not found in PATH (apt-get install {pkg})");
            return false;
        }
    }
    true
}

/// For tests: [`require_lab`] with `nft` as well (root, `ip`, `nsenter`, `nft`), the gate the
/// end-to-end suites have always used.
pub fn require_root(test: &str) -> bool {
    require_lab(test, &["nft"])
}

/// Finds the `weft` binary for tests: `$WEFT_BIN` if set, else `weft` next to the running test
/// executable's `deps/` directory (`target/<profile>/weft`). Cargo only builds it for tests of the
/// `weft` package itself, so elsewhere run `cargo build -p weft` first (or it may be stale).
pub fn find_weft_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let candidate = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .map(|d| d.join("weft"));
    match candidate {
        Some(p) if p.is_file() => Ok(p),
        _ => bail!(
            "no weft binary next to {} (run `cargo build -p weft` or set WEFT_BIN)",
            exe.display()
        ),
    }
}

/// Removes leftovers of labs whose creating process is dead (the PID is part of every name):
/// kills processes still inside their namespaces, deletes the namespaces and `/tmp/weft-lab-<id>*`
/// dirs and files. Returns how many namespaces were deleted. Labs of live processes are never touched.
pub fn cleanup_stale() -> Result<usize> {
    let mut count = 0;
    let mut errors = Vec::new();
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((id, rest)) = name.split_once('-') else {
                continue;
            };
            if stale_id(id) && !rest.is_empty() {
                match remove_netns(&name) {
                    Ok(()) => count += 1,
                    // another process cleaning up at the same time got there first
                    Err(_) if !e.path().exists() => {}
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/tmp") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name
                .strip_prefix("weft-lab-")
                .and_then(|r| r.split('-').next());
            if id.is_some_and(stale_id) {
                let path = e.path();
                let res = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if let Err(err) = res.or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }) {
                    errors.push(format!("removing {}: {err}", e.path().display()));
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!(
            "cleanup of stale labs removed {count} namespaces but failed on: {}",
            errors.join("; ")
        );
    }
    Ok(count)
}

/// `weft lab demo`: builds `cfg.hosts` hosts, starts a router on each (host i>0 gets host 0 as
/// its peer), waits for a full mesh, attaches container `c<i>` (name `c<i>.weft.local`) to each
/// host with an address from weft's IPAM (the hosts agree on the range split on the first
/// request), pings every other container from `c0` ([`probe::icmp_echo`]), resolves their names
/// from `c0` through h0's weft DNS server ([`probe::dns_query_a`]; skipped if none listens), and
/// writes progress and a summary to `out`. Needs root, `ip` and `nsenter`, nothing else.
/// Cleans up unless `cfg.keep`. Errors if any step, ping or name lookup fails.
pub fn demo(cfg: LabConfig, out: &mut dyn std::io::Write) -> Result<()> {
    let n = cfg.hosts;
    if !(2..=250).contains(&n) {
        bail!("the demo needs 2 to 250 hosts, not {n}");
    }
    if !is_root() {
        bail!("the lab demo needs root: it creates network namespaces (run it with sudo)");
    }
    let keep = cfg.keep;
    let start = Instant::now();
    let stamp = |start: Instant| format!("[{:5.1}s]", start.elapsed().as_secs_f64());
    writeln!(
        out,
        "weft lab demo: {n} hosts on one underlay switch (192.168.77.0/24), one container on each"
    )?;
    let mut lab = Lab::new(cfg)?;
    writeln!(
        out,
        "{} created lab {}: switch {} and hosts {}-h0..h{}",
        stamp(start),
        lab.id,
        lab.switch,
        lab.id,
        n - 1
    )?;
    for i in 0..n {
        let peers: &[usize] = if i == 0 { &[] } else { &[0] };
        lab.start_router(i, peers)?;
        let pid = lab.hosts[i].router_pid().unwrap_or(0);
        let via = if i == 0 {
            String::new()
        } else {
            format!(", peer {}", lab.hosts[0].underlay_ip)
        };
        writeln!(
            out,
            "{} started router h{i} (pid {pid}, {}{via})",
            stamp(start),
            lab.hosts[i].underlay_ip
        )?;
    }
    let timeout = Duration::from_secs(30 + 2 * n as u64);
    for i in 0..n {
        lab.wait_established(i, n - 1, timeout)?;
    }
    writeln!(
        out,
        "{} mesh connected: every router has {} established connections",
        stamp(start),
        n - 1
    )?;
    for i in 0..n {
        let v = lab.weft_json(i, &["status"])?;
        let conns = v["connections"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let paths: BTreeSet<&str> = conns.iter().filter_map(|c| c["path"].as_str()).collect();
        let encrypted = conns
            .iter()
            .filter(|c| c["encrypted"].as_bool() == Some(true))
            .count();
        writeln!(
            out,
            "         h{i} {}: encryption {}, {encrypted}/{} connections encrypted, paths: {}",
            v["name"].as_str().unwrap_or("?"),
            v["encryption"].as_str().unwrap_or("?"),
            conns.len(),
            if paths.is_empty() {
                "-".to_string()
            } else {
                paths.into_iter().collect::<Vec<_>>().join(",")
            }
        )?;
    }
    let mut containers = Vec::new();
    for i in 0..n {
        let name = format!("c{i}");
        let c = lab.add_container_auto_with(i, &name, &["--name", &name])?;
        writeln!(
            out,
            "{} attached container {} ({}, name {name}.weft.local) to h{i}",
            stamp(start),
            c.ns,
            c.ip
        )?;
        containers.push(c);
    }
    let from = lab.netns_path(&containers[0].ns)?;
    let mut failed = Vec::new();
    let mut summary = String::new();
    for c in &containers[1..] {
        let result = ping_until(&from, c.ip, Duration::from_secs(15));
        let line = match &result {
            Ok(rtt) => format!("c0 -> c{} {} on h{}: ok, {rtt}", c.host, c.ip, c.host),
            Err(e) => {
                failed.push(format!("ping c{} {}", c.host, c.ip));
                format!("c0 -> c{} {} on h{}: FAILED ({e:#})", c.host, c.ip, c.host)
            }
        };
        writeln!(out, "{} ping {line}", stamp(start))?;
        let _ = writeln!(summary, "  {line}");
    }
    let pings_failed = failed.len();
    let mut names = String::new();
    // Names: ask h0's DNS server from c0 for every other container's name. The server listens
    // on port 53 of h0's bridge address once the bridge has one; `status dns` fails (or lists
    // nothing) when there is no server.
    let server = lab.weft_json(0, &["status", "dns"]).ok().and_then(|v| {
        v["listening"].as_array().and_then(|l| {
            l.iter()
                .filter_map(|a| a.as_str()?.parse::<SocketAddrV4>().ok())
                .map(|a| *a.ip())
                .next()
        })
    });
    match server {
        Some(server) => {
            for c in &containers[1..] {
                let name = format!("c{}.weft.local", c.host);
                let line = match resolve_until(&from, server, &name, c.ip, Duration::from_secs(10)) {
                    Ok(()) => format!("c0 resolves {name}: {} (weft DNS at {server})", c.ip),
                    Err(e) => {
                        failed.push(format!("name {name}"));
                        format!("c0 resolves {name}: FAILED ({e:#})")
                    }
                };
                writeln!(out, "{} dns {line}", stamp(start))?;
                let _ = writeln!(summary, "  {line}");
            }
            let names_failed = failed.len() - pings_failed;
            names = format!(", {} of {} names resolved", n - 1 - names_failed, n - 1);
        }
        None => writeln!(out, "{} dns: skipped (no DNS server listening on h0)", stamp(start))?,
    }
    writeln!(
        out,
        "summary: {n} hosts, {} connections, {} of {} pings ok{names}",
        n * (n - 1) / 2,
        n - 1 - pings_failed,
        n - 1
    )?;
    write!(out, "{summary}")?;
    if keep {
        writeln!(
            out,
            "kept lab {} (--keep): namespaces under /run/netns/{}-*, logs in {}",
            lab.id,
            lab.id,
            lab.dir.display()
        )?;
        for h in &lab.hosts {
            writeln!(
                out,
                "  h{}: router pid {}; nsenter --net=/run/netns/{} {} --api-socket {} status",
                h.index,
                h.router_pid().unwrap_or(0),
                h.ns,
                lab.cfg.weft_bin.display(),
                h.api_socket.display()
            )?;
        }
        writeln!(out, "  stop the routers by PID, then `ip netns del` the namespaces (or clean up stale labs)")?;
    }
    drop(lab);
    if !keep {
        writeln!(out, "{} cleaned up", stamp(start))?;
    }
    if !failed.is_empty() {
        bail!("{} checks from c0 failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// Sends ICMP echoes to `ip` from the namespace at `from` (1 s timeout each) until one is
/// answered or `limit` passes, then 3 more; returns "rtt avg X ms" over the answered ones.
fn ping_until(from: &Path, ip: Ipv4Addr, limit: Duration) -> Result<String> {
    const EACH: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + limit;
    let first = loop {
        let t0 = Instant::now();
        match probe::icmp_echo(from, ip, EACH) {
            Ok(rtt) => break rtt,
            Err(e) if Instant::now() >= deadline => bail!("no answer within {limit:?}; last: {e:#}"),
            // A quick failure (e.g. "network unreachable") waits out its second, so as not to spin.
            Err(_) => thread::sleep(EACH.saturating_sub(t0.elapsed()).min(deadline.saturating_duration_since(Instant::now()))),
        }
    };
    let mut rtts: Vec<Duration> = (0..3).filter_map(|_| probe::icmp_echo(from, ip, EACH).ok()).collect();
    if rtts.is_empty() {
        rtts.push(first);
    }
    let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
    Ok(format!("rtt avg {:.3} ms", avg.as_secs_f64() * 1000.0))
}

/// Asks DNS server `server` from the namespace at `from` for `name` (1 s timeout each, every
/// 200 ms) until the answer includes `want` or `limit` passes; the error has the last answer.
fn resolve_until(from: &Path, server: Ipv4Addr, name: &str, want: Ipv4Addr, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let last = match probe::dns_query_a(from, server, name, Duration::from_secs(1)) {
            Ok(addrs) if addrs.contains(&want) => return Ok(()),
            Ok(addrs) if addrs.is_empty() => "no address (NXDOMAIN or no A record)".to_string(),
            Ok(addrs) => format!("{addrs:?}"),
            Err(e) => format!("{e:#}"),
        };
        if t0.elapsed() >= limit {
            bail!("got {last}, want {want}, after {limit:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn count_established(status: &serde_json::Value) -> usize {
    status["connections"].as_array().map_or(0, |cs| {
        cs.iter()
            .filter(|c| c["state"].as_str() == Some("established"))
            .count()
    })
}

fn summarize_status(status: &serde_json::Value) -> String {
    let Some(conns) = status["connections"].as_array() else {
        return status.to_string();
    };
    if conns.is_empty() {
        return "  (no connections)".to_string();
    }
    let mut s = String::new();
    for c in conns {
        let f = |k: &str| c[k].as_str().unwrap_or("-").to_string();
        let _ = writeln!(
            s,
            "  {} {} {} {}",
            f("address"),
            f("peer_nickname"),
            f("state"),
            f("info")
        );
    }
    s
}

/// A fresh lab id whose namespaces and temp dir do not exist yet.
fn fresh_id() -> String {
    loop {
        let id = format!(
            "wl{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        if !Path::new(&format!("{NETNS_DIR}/{id}-sw")).exists()
            && !Path::new(&format!("/tmp/weft-lab-{id}")).exists()
        {
            return id;
        }
    }
}

/// Whether `id` is `wl<pid>x<n>` with `<pid>` no longer running.
fn stale_id(id: &str) -> bool {
    let Some((pid, n)) = id.strip_prefix("wl").and_then(|r| r.split_once('x')) else {
        return false;
    };
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    match pid.parse::<u32>() {
        Ok(pid) if pid > 0 && pid != std::process::id() => !pid_exists(pid),
        _ => false,
    }
}

fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let ok = unsafe { libc::kill(pid as libc::pid_t, 0) == 0 };
    ok || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Exists and is not a zombie.
fn pid_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Kills (SIGKILL, by PID) every process in namespace `ns`, then deletes it.
/// Also kills their descendants (by PID, from `/proc`), which may live in other namespaces: the
/// processes of containers a lab dockerd ran (children of `containerd-shim`s in the host
/// namespace, in their own network namespaces), e.g. of a crashed test's [`docker::Dockerd`].
fn remove_netns(ns: &str) -> Result<()> {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", ns]), CMD_TIMEOUT) {
        let listed: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect();
        // Descendants first looked up, then everything killed: the table is read before any kill,
        // so children are still attached to their parents.
        let table = proc_table();
        let procs = with_descendants(&table, &listed);
        let spared = own_ancestry(&table);
        for p in procs {
            if p.pid > 1 && !spared.contains(&p.pid) {
                kill_same(p, libc::SIGKILL);
            }
        }
    }
    // A resolv.conf weft wrote for the namespace (what `ip netns exec` shows).
    let etc = Path::new("/etc/netns").join(ns);
    if fs::read_to_string(etc.join("resolv.conf")).is_ok_and(|s| s.starts_with("# written by weft")) {
        let _ = fs::remove_file(etc.join("resolv.conf"));
        let _ = fs::remove_dir(&etc);
    }
    ip(&["netns", "del", ns])
}

/// One process as `/proc/<pid>/stat` shows it. `start` (field 22, clock ticks since boot) makes
/// `(pid, start)` name one process for good, so a recycled PID is never signalled by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcInfo {
    pub(crate) pid: i32,
    pub(crate) ppid: i32,
    pub(crate) start: u64,
    pub(crate) zombie: bool,
}

/// `/proc/<pid>/stat` of one process, `None` if it is gone.
pub(crate) fn proc_info(pid: i32) -> Option<ProcInfo> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
        zombie: f.first()? == &"Z",
    })
}

/// Every process in `/proc` (those that vanish while reading are left out).
pub(crate) fn proc_table() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// The processes `roots` (those in `table`) and all their descendants in `table`.
pub(crate) fn with_descendants(table: &[ProcInfo], roots: &[i32]) -> Vec<ProcInfo> {
    let mut found: Vec<ProcInfo> = table.iter().filter(|p| roots.contains(&p.pid)).copied().collect();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].pid;
        for p in table {
            if p.ppid == parent && !found.iter().any(|f| f.pid == p.pid) {
                found.push(*p);
            }
        }
        i += 1;
    }
    found
}

/// This process and its ancestors, which cleanup must never signal.
pub(crate) fn own_ancestry(table: &[ProcInfo]) -> Vec<i32> {
    let mut out = vec![std::process::id() as i32];
    let mut cur = std::process::id() as i32;
    while let Some(p) = table.iter().find(|p| p.pid == cur) {
        if p.ppid <= 0 || out.contains(&p.ppid) {
            break;
        }
        out.push(p.ppid);
        cur = p.ppid;
    }
    out
}

/// Sends `signal` to `p` if that PID still is the same process (same start time).
pub(crate) fn kill_same(p: ProcInfo, signal: i32) {
    if proc_info(p.pid).is_some_and(|now| now.start == p.start) {
        // SAFETY: plain syscall on a PID just checked to be the process we recorded.
        unsafe { libc::kill(p.pid, signal) };
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL and reap.
fn stop_child(child: &mut Child, grace: Duration) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    // SAFETY: our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if wait_timeout(child, grace)?.is_none() {
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

fn nsenter(ns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}"));
    c
}

fn ip(args: &[&str]) -> Result<()> {
    checked(Command::new("ip").args(args))
}

/// Runs `cmd`; fails with its stderr unless it exits 0.
fn checked(cmd: &mut Command) -> Result<()> {
    stdout_of(cmd).map(|_| ())
}

/// Runs `cmd`; its stdout if it exits 0, else an error with its stderr.
fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = run(cmd, CMD_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "command `{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with stdin closed, collecting output; kills it (by PID) after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start `{}` (is it installed and in PATH?)",
                describe(cmd)
            )
        })?;
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (so, se) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let Some(status) = wait_timeout(&mut child, limit)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "command `{}` did not finish within {limit:?}; killed it",
            describe(cmd)
        );
    };
    Ok(Output {
        status,
        stdout: so.join().unwrap_or_default(),
        stderr: se.join().unwrap_or_default(),
    })
}

/// The command line, with `--password` values hidden.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    let mut hide = false;
    for a in cmd.get_args() {
        s.push(' ');
        let shown = a.to_string_lossy();
        s.push_str(if hide { "***" } else { &shown });
        hide = a == "--password";
    }
    s
}

fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The Debian package that has `tool`, for "install it" messages.
fn debian_package(tool: &str) -> &str {
    match tool {
        "ip" => "iproute2",
        "nsenter" => "util-linux",
        "nft" => "nftables",
        "ping" => "iputils-ping",
        "dig" => "bind9-dnsutils",
        "dnsmasq" => "dnsmasq-base",
        "ls" | "wc" | "sleep" => "coreutils",
        other => other,
    }
}

/// Fails unless `tool` is in PATH: "<who> needs `<tool>` from <package>: apt-get install <package>".
fn need_tool(tool: &str, who: &str) -> Result<()> {
    if in_path(tool) {
        return Ok(());
    }
    let pkg = debian_package(tool);
    bail!("{who} needs `{tool}` from {pkg}: apt-get install {pkg} (`{tool}` is not in PATH)")
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
