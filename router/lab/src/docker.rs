//! One Docker daemon per lab host, for end-to-end tests of weft's Docker network plugin.
//!
//! [`Dockerd::start`] runs Debian's `dockerd` (docker.io 20.10) inside lab host `i`'s network
//! namespace and in a private mount namespace of its own, with everything it owns under
//! `<lab.dir()>/docker-h<i>/` ([`host_dir`]):
//!
//! | path | what |
//! | --- | --- |
//! | `plugins/` | bind-mounted on `/run/docker/plugins` for that dockerd: put the plugin socket here ([`Dockerd::plugin_dir`]) |
//! | `data/` | `--data-root` (vfs layers; removed when the [`Dockerd`] is dropped) |
//! | `exec/` | `--exec-root`: its containerd, runc state, and the sandbox netns files (`exec/netns/<id>`) |
//! | `etc/` | bind-mounted on `/etc/docker` (dockerd writes `key.json` there; no plugin specs) |
//! | `docker.sock`, `docker.pid` | API socket (`DOCKER_HOST=unix://…`, [`Dockerd::socket`]) and pid file |
//! | `daemon.json` | `--config-file` (`{}` unless a test writes it, see [`Dockerd::start_with`]) |
//! | `dockerd.log` | dockerd's stdout and stderr, appended across restarts |
//! | `cli/` | `DOCKER_CONFIG` for the CLI and compose, so `~/.docker` is never read |
//!
//! The command (one `sh` that sets up the mount namespace and then `exec`s dockerd, so the PID
//! held is dockerd's; run with `PATH=/usr/sbin:/usr/bin:/sbin:/bin`, [`DOCKERD_PATH`]):
//!
//! ```text
//! nsenter --net=/run/netns/<ns> unshare --mount --propagation private sh -c '
//!   set -e
//!   mkdir -p /run/docker /run/containerd /etc/docker
//!   mount -t tmpfs -o mode=0711 weft-lab-docker /run/docker
//!   mount -t tmpfs -o mode=0711 weft-lab-containerd /run/containerd
//!   mkdir -p /run/docker/plugins
//!   mount --bind <dir>/plugins /run/docker/plugins
//!   mount --bind <dir>/etc /etc/docker
//!   if [ -d /usr/lib/docker/plugins ]; then mount -t tmpfs -o mode=0755 weft-lab-docker-plugins /usr/lib/docker/plugins; fi
//!   exec /usr/sbin/dockerd --data-root <dir>/data --exec-root <dir>/exec -H unix://<dir>/docker.sock
//!     --pidfile <dir>/docker.pid --config-file <dir>/daemon.json --storage-driver vfs
//!     --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false'
//! ```
//!
//! Why: dockerd looks for v1 plugins only in the fixed directories `/run/docker/plugins`,
//! `/etc/docker/plugins` and `/usr/lib/docker/plugins`, so each lab host needs its own mount
//! namespace; the bind mount of `<dir>/plugins` lets a router in the *root* mount namespace (the
//! lab's routers run there) serve `<dir>/plugins/weft.sock`, and it survives [`Dockerd::restart`].
//! `/run/docker` (= `/var/run/docker`, `/var/run` is a link to `/run`) and `/run/containerd`
//! (where containerd 1.6 puts its shims' sockets, `s/<hash>`) are tmpfs private to that dockerd,
//! so two dockerds never share a file there and nothing is left behind. `nsenter --net=` rather
//! than `ip netns exec`: the latter remounts `/sys` without the cgroup hierarchies ("Devices
//! cgroup isn't mounted"). Docker's default bridge `docker0` (172.17.0.0/16) stays on: it lives
//! in the lab host's namespace, so every host has its own.
//!
//! Each dockerd gets the image [`BUSYBOX_IMAGE`] (`weft-lab/busybox:1`, `CMD ["sh"]`), made with
//! `docker import` from a rootfs tarball built once per lab from the machine's static
//! `/bin/busybox` (Debian busybox-static). Nothing is ever pulled: there is no registry here, and
//! lab traffic stays between the lab's namespaces. (A `docker run` of a missing image tries to
//! pull and fails after a DNS error.)
//!
//! Drop order: a [`Dockerd`] must be dropped before its [`Lab`]. Declare it after the lab
//! (`let lab = Lab::new(..)?; let d = Dockerd::start(&lab, 0)?;`), so it drops first, also when
//! the test panics. Dropping it removes all containers (`docker rm -f`, so no container's 10 s
//! stop timeout is waited for), stops dockerd (SIGTERM, then SIGKILL after 20 s), kills by PID
//! whatever of it is left (its containerd, `containerd-shim`s, container processes: the
//! processes in its private mount namespace and their descendants; the shims are reparented to
//! PID 1, so they are not dockerd's descendants) and removes `data/` and `exec/`. If the lab
//! was built with [`LabConfig::keep`](crate::LabConfig::keep), dockerd is left running instead.
//! A crashed test's dockerd is removed by [`cleanup_stale`](crate::cleanup_stale): it kills the
//! processes in the stale host namespace (dockerd, containerd, shims) and their descendants (the
//! containers), then deletes the lab dir.
//!
//! Gotchas:
//! - The sandbox netns files (`SandboxKey` in `docker inspect`, and what a network plugin gets in
//!   `Join`) are `<dir>/exec/netns/<id>`: nsfs bind mounts that exist only in that dockerd's
//!   mount namespace (empty files elsewhere). From the root mount namespace use
//!   `/proc/<State.Pid>/ns/net` ([`Dockerd::container_netns`]), or enter dockerd's mount
//!   namespace ([`Dockerd::mount_ns`]).
//! - `daemon.json` must not repeat a setting given as a flag above (dockerd refuses to start:
//!   "the following directives are specified both as a flag and in the configuration file").
//! - With `--iptables=false` nothing is NATed or filtered: containers on `docker0` reach the lab
//!   host namespace and each other, nothing else.
//! - `mkdir -p /run/docker /run/containerd /etc/docker` may leave those empty directories in the
//!   root filesystem (mount points need to exist).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use weft_lab::{docker::Dockerd, Lab, LabConfig};
//! if !weft_lab::docker::require_docker("my_docker_test") {
//!     return Ok(());
//! }
//! let lab = Lab::new(LabConfig::new(2, weft_lab::find_weft_bin()?))?;
//! let docker = Dockerd::start_all(&lab, &[0, 1])?; // dropped before `lab`
//! let out = docker[0].docker_ok(&["run", "--rm", weft_lab::docker::BUSYBOX_IMAGE, "echo", "hi"])?;
//! assert_eq!(out, "hi");
//! # Ok(()) }
//! ```

use super::{
    in_path, is_root, kill_same, own_ancestry, proc_info, proc_table, run, tail, wait_timeout, Lab,
    ProcInfo, NETNS_DIR,
};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// The daemon (Debian docker.io 20.10).
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The CLI of the same package. Not `docker` from PATH: a newer CLI may sit first there.
pub const DOCKER_CLI: &str = "/usr/bin/docker";
/// Compose 1.29 (Debian docker-compose).
pub const DOCKER_COMPOSE: &str = "/usr/bin/docker-compose";
/// The static busybox the image is made of (Debian busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";
/// The image every lab dockerd has (`docker import`ed busybox, `CMD ["sh"]`).
pub const BUSYBOX_IMAGE: &str = "weft-lab/busybox:1";

/// dockerd's PATH: Debian's containerd, runc and docker-init, whatever the test's PATH holds
/// (a newer `docker` or `containerd` in `/usr/local/bin` would not match dockerd 20.10).
pub const DOCKERD_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// How long dockerd has to answer `docker info` after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for [`Dockerd::docker`] and [`Dockerd::compose`] commands.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd gets between SIGTERM and SIGKILL (its own `--shutdown-timeout` is 15 s).
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// Serialises building the busybox tarball within this process.
static TARBALL_LOCK: Mutex<()> = Mutex::new(());

/// What is missing for [`Dockerd`], as a message naming the package, or `None`.
fn missing() -> Option<String> {
    for (path, pkg) in [
        (DOCKERD, "docker.io"),
        (DOCKER_CLI, "docker.io"),
        (BUSYBOX, "busybox-static"),
    ] {
        if !Path::new(path).is_file() {
            return Some(format!("{path} not found (apt-get install {pkg})"));
        }
    }
    if !is_static_elf(Path::new(BUSYBOX)) {
        return Some(format!(
            "{BUSYBOX} is not statically linked, so it cannot be copied into an image (apt-get install busybox-static)"
        ));
    }
    for (tool, pkg) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("tar", "tar"),
    ] {
        if !in_path(tool) {
            return Some(format!("`{tool}` not found in PATH (apt-get install {pkg})"));
        }
    }
    // dockerd runs containerd, runc and docker-init from its PATH (DOCKERD_PATH), containerd
    // runs containerd-shim-runc-v2.
    for (tool, pkg) in [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("docker-init", "tini"),
    ] {
        if !std::env::split_paths(DOCKERD_PATH).any(|d| d.join(tool).is_file()) {
            return Some(format!("`{tool}` not found in {DOCKERD_PATH} (apt-get install {pkg})"));
        }
    }
    None
}

/// Whether [`Dockerd`] can run here: root, dockerd, its CLI, containerd, runc, a static busybox,
/// `ip`, `nsenter`, `unshare` and `tar`.
pub fn docker_available() -> bool {
    is_root() && missing().is_none()
}

/// For tests: `true` when [`docker_available`]; otherwise prints `skipping <test>: ...` naming
/// what is missing and its Debian package, and returns `false`.
pub fn require_docker(test: &str) -> bool {
    if !is_root() {
        eprintln!("skipping {test}: needs root (lab tests create network namespaces and run dockerd)");
        return false;
    }
    if let Some(why) = missing() {
        eprintln!("skipping {test}: {why}");
        return false;
    }
    true
}

/// For tests: [`require_docker`] and `/usr/bin/docker-compose` (Debian docker-compose).
pub fn require_compose(test: &str) -> bool {
    if !require_docker(test) {
        return false;
    }
    if !Path::new(DOCKER_COMPOSE).is_file() {
        eprintln!("skipping {test}: {DOCKER_COMPOSE} not found (apt-get install docker-compose)");
        return false;
    }
    true
}

/// The directory of host `host`'s dockerd, `<lab.dir()>/docker-h<host>`, e.g. to write its
/// `daemon.json` or look at its `plugins/` before [`Dockerd::start`].
pub fn host_dir(lab: &Lab, host: usize) -> PathBuf {
    lab.dir().join(format!("docker-h{host}"))
}

/// The `weft router` arguments that make host `host`'s router serve its plugin where that host's
/// dockerd looks (`--docker-plugin-dir <host_dir>/plugins`) and follow that dockerd
/// (`--docker-socket <host_dir>/docker.sock`). Known before [`Dockerd::start`], so they can go to
/// [`Lab::configure_host`] first. Lab routers run in the root mount namespace: without these
/// flags every host's router would use the same `/run/docker/plugins/weft.sock`.
pub fn router_args(lab: &Lab, host: usize) -> Vec<String> {
    let dir = host_dir(lab, host);
    vec![
        "--docker-socket".into(),
        dir.join("docker.sock").to_string_lossy().into_owned(),
        "--docker-plugin-dir".into(),
        dir.join("plugins").to_string_lossy().into_owned(),
    ]
}

/// A dockerd running in a lab host's network namespace; see the module docs. Drop it before the
/// [`Lab`].
#[derive(Debug)]
pub struct Dockerd {
    host: usize,
    ns: String,
    dir: PathBuf,
    lab_dir: PathBuf,
    keep: bool,
    child: Option<Child>,
    /// An open handle on dockerd's private mount namespace: while it is open the namespace (and
    /// so its inode number) cannot be reused, so "processes in this mount namespace" names
    /// exactly this dockerd's processes (its containerd and the shims, which are reparented to
    /// PID 1).
    mnt_ns: Option<(File, u64, u64)>,
    /// Whether this value ever spawned dockerd: only then are `data/` and `exec/` its to remove
    /// (not when it was refused because another dockerd runs for the host).
    spawned: bool,
}

impl Dockerd {
    /// Starts dockerd on lab host `host` (writing `daemon.json` as `{}` if absent), waits until
    /// it answers (at most 30 s; the error has the tail of `dockerd.log`) and imports
    /// [`BUSYBOX_IMAGE`] unless it has it already.
    pub fn start(lab: &Lab, host: usize) -> Result<Dockerd> {
        Dockerd::start_inner(lab, host, None)
    }

    /// Like [`Dockerd::start`], with `daemon_json` written to `daemon.json` first (replacing
    /// it). It must not set what the command line sets (`data-root`, `exec-root`, `hosts`,
    /// `pidfile`, `storage-driver`, `iptables`, `ip6tables`, `ip-masq`, `userland-proxy`).
    pub fn start_with(lab: &Lab, host: usize, daemon_json: &serde_json::Value) -> Result<Dockerd> {
        Dockerd::start_inner(lab, host, Some(daemon_json))
    }

    /// Starts one dockerd on each of `hosts` at the same time (threads); all or nothing.
    pub fn start_all(lab: &Lab, hosts: &[usize]) -> Result<Vec<Dockerd>> {
        // Build the tarball once up front rather than in every thread.
        busybox_tarball(lab.dir())?;
        let results: Vec<Result<Dockerd>> = thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|&h| s.spawn(move || Dockerd::start(lab, h)))
                .collect();
            handles
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err(anyhow!("dockerd start thread panicked"))))
                .collect()
        });
        // On an error the others are dropped here, which stops them.
        results.into_iter().collect()
    }

    fn start_inner(lab: &Lab, host: usize, daemon_json: Option<&serde_json::Value>) -> Result<Dockerd> {
        let ns = lab.checked_host(host)?.ns.clone();
        let mut d = Dockerd::unstarted(ns, lab.dir(), host, lab.cfg.keep)?;
        d.check_no_other()?;
        match daemon_json {
            Some(v) => fs::write(d.daemon_json(), serde_json::to_vec_pretty(v)?)
                .with_context(|| format!("cannot write {}", d.daemon_json().display()))?,
            None => {
                if !d.daemon_json().exists() {
                    fs::write(d.daemon_json(), "{}\n")
                        .with_context(|| format!("cannot write {}", d.daemon_json().display()))?;
                }
            }
        }
        d.launch()?;
        d.ensure_image()
            .with_context(|| format!("importing {BUSYBOX_IMAGE} into the dockerd of host {host}"))?;
        Ok(d)
    }

    /// A [`Dockerd`] for namespace `ns`, with its directories made, not running yet.
    fn unstarted(ns: String, lab_dir: &Path, host: usize, keep: bool) -> Result<Dockerd> {
        let dir = lab_dir.join(format!("docker-h{host}"));
        // The paths go into a shell script and unix socket addresses.
        if !dir.to_string_lossy().bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)) {
            bail!("dockerd directory {} has characters other than [A-Za-z0-9/._-]", dir.display());
        }
        for sub in ["plugins", "data", "exec", "etc", "cli"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        Ok(Dockerd {
            host,
            ns,
            dir,
            lab_dir: lab_dir.to_path_buf(),
            keep,
            child: None,
            mnt_ns: None,
            spawned: false,
        })
    }

    /// Fails if the pid file names a live dockerd: a second [`Dockerd`] for the same host.
    fn check_no_other(&self) -> Result<()> {
        let pid_file = self.dir.join("docker.pid");
        if let Some(pid) = fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            if fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == Path::new(DOCKERD)) {
                bail!(
                    "a dockerd already runs for host {} (pid {pid}, {}): one Dockerd per lab host",
                    self.host,
                    pid_file.display()
                );
            }
        }
        Ok(())
    }

    /// The shell script run by `unshare`: private mounts, then `exec dockerd`.
    fn script(&self) -> String {
        let d = self.dir.display();
        format!(
            "set -e\n\
             mkdir -p /run/docker /run/containerd /etc/docker\n\
             mount -t tmpfs -o mode=0711 weft-lab-docker /run/docker\n\
             mount -t tmpfs -o mode=0711 weft-lab-containerd /run/containerd\n\
             mkdir -p /run/docker/plugins\n\
             mount --bind '{d}/plugins' /run/docker/plugins\n\
             mount --bind '{d}/etc' /etc/docker\n\
             if [ -d /usr/lib/docker/plugins ]; then mount -t tmpfs -o mode=0755 weft-lab-docker-plugins /usr/lib/docker/plugins; fi\n\
             exec {DOCKERD} --data-root '{d}/data' --exec-root '{d}/exec' -H 'unix://{d}/docker.sock' \
             --pidfile '{d}/docker.pid' --config-file '{d}/daemon.json' --storage-driver vfs \
             --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false\n"
        )
    }

    /// Starts dockerd and waits for it; on failure kills what it started.
    fn launch(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("dockerd of host {} is already running", self.host);
        }
        // A pid file left by a killed dockerd makes the next one refuse to start if that PID
        // has been reused.
        self.check_no_other()?;
        let _ = fs::remove_file(self.dir.join("docker.pid"));
        let log_path = self.log();
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let script = self.script();
        {
            use std::io::Write;
            writeln!(
                log,
                "=== weft-lab: starting dockerd: nsenter --net={NETNS_DIR}/{} unshare --mount --propagation private sh -c '{script}'",
                self.ns
            )?;
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={NETNS_DIR}/{}", self.ns))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script)
            .env("PATH", DOCKERD_PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("cannot start nsenter (util-linux) for dockerd")?;
        self.child = Some(child);
        self.spawned = true;
        if let Err(e) = self.wait_ready() {
            let _ = self.shutdown(Duration::from_secs(5), false);
            return Err(e);
        }
        Ok(())
    }

    /// Waits until `docker info` answers, then takes hold of dockerd's mount namespace.
    fn wait_ready(&mut self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => bail!("dockerd of host {} is not running", self.host),
            };
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "dockerd of host {} exited during start-up ({status}); last lines of {}:\n{}",
                    self.host,
                    self.log().display(),
                    tail(&self.log(), 30)
                );
            }
            let answered = self.socket().exists()
                && self
                    .docker_timeout(&["info", "--format", "{{.ServerVersion}}"], Duration::from_secs(5))
                    .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty());
            if answered {
                break;
            }
            if t0.elapsed() > READY_TIMEOUT {
                bail!(
                    "dockerd of host {} did not answer `docker info` within {READY_TIMEOUT:?}; last lines of {}:\n{}",
                    self.host,
                    self.log().display(),
                    tail(&self.log(), 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // By now nsenter, unshare and sh have exec'd into dockerd: check, then hold its mount ns.
        let pid = self.pid().unwrap_or(0);
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe != Path::new(DOCKERD) {
            bail!("PID {pid} answering as dockerd of host {} runs {}, not {DOCKERD}", self.host, exe.display());
        }
        let path = format!("/proc/{pid}/ns/mnt");
        let f = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        let m = f.metadata()?;
        let own = fs::metadata("/proc/self/ns/mnt")?;
        if (m.dev(), m.ino()) == (own.dev(), own.ino()) {
            bail!("dockerd of host {} runs in this process's mount namespace, not a private one", self.host);
        }
        self.mnt_ns = Some((f, m.dev(), m.ino()));
        Ok(())
    }

    /// Imports [`BUSYBOX_IMAGE`] unless dockerd has it.
    fn ensure_image(&self) -> Result<()> {
        if self.docker(&["image", "inspect", "--format", "{{.Id}}", BUSYBOX_IMAGE])?.status.success() {
            return Ok(());
        }
        let tar = busybox_tarball(&self.lab_dir)?;
        let tar = tar.to_string_lossy();
        self.docker_ok(&["import", "--change", r#"CMD ["sh"]"#, &tar, BUSYBOX_IMAGE])?;
        Ok(())
    }

    /// The processes of this dockerd: dockerd, the processes in its mount namespace (its
    /// containerd, the shims) and all their descendants (the containers' processes).
    fn processes(&self) -> Vec<ProcInfo> {
        let table = proc_table();
        let mut roots: Vec<i32> = self.pid().map(|p| p as i32).into_iter().collect();
        if let Some((_, dev, ino)) = &self.mnt_ns {
            for p in &table {
                if let Ok(m) = fs::metadata(format!("/proc/{}/ns/mnt", p.pid)) {
                    if (m.dev(), m.ino()) == (*dev, *ino) && !roots.contains(&p.pid) {
                        roots.push(p.pid);
                    }
                }
            }
        }
        let spared = own_ancestry(&table);
        super::with_descendants(&table, &roots)
            .into_iter()
            .filter(|p| !spared.contains(&p.pid) && !p.zombie)
            .collect()
    }

    /// Stops dockerd: optionally `docker rm -f` every container first, then SIGTERM, `grace`,
    /// SIGKILL; then SIGKILL (by PID) whatever of it is left and wait for that. Returns problems.
    fn shutdown(&mut self, grace: Duration, remove_containers: bool) -> Vec<String> {
        let mut errors = Vec::new();
        if self.child.is_none() && self.mnt_ns.is_none() {
            return errors;
        }
        let alive = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if alive && remove_containers {
            // Faster than letting dockerd stop them (10 s for a `sleep` that ignores SIGTERM).
            match self.docker_timeout(&["ps", "-aq"], Duration::from_secs(10)) {
                Ok(o) if o.status.success() => {
                    let ids = String::from_utf8_lossy(&o.stdout).into_owned();
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    if !ids.is_empty() {
                        let mut args = vec!["rm", "-f", "-v"];
                        args.extend(ids);
                        match self.docker_timeout(&args, Duration::from_secs(30)) {
                            Ok(o) if o.status.success() => {}
                            Ok(o) => errors.push(format!("docker rm -f: {}", String::from_utf8_lossy(&o.stderr).trim())),
                            Err(e) => errors.push(format!("{e:#}")),
                        }
                    }
                }
                Ok(o) => errors.push(format!("docker ps: {}", String::from_utf8_lossy(&o.stderr).trim())),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // Recorded before dockerd goes: afterwards its processes are still found through the
        // mount namespace, but this also covers a dockerd whose namespace we never got hold of.
        let mut procs = self.processes();
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: our own unreaped child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                match wait_timeout(&mut child, grace) {
                    Ok(Some(_)) => {}
                    _ => {
                        errors.push(format!("dockerd (pid {pid}) did not stop within {grace:?} of SIGTERM; killed it"));
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
        // Its containerd exits with it; shims go once their containers are deleted. Give them a
        // moment, then kill what is left, including anything that started meanwhile.
        let still = |procs: &[ProcInfo]| -> Vec<ProcInfo> {
            procs
                .iter()
                .filter(|p| proc_info(p.pid).is_some_and(|now| now.start == p.start && !now.zombie))
                .copied()
                .collect()
        };
        let t0 = Instant::now();
        while !still(&procs).is_empty() && t0.elapsed() < Duration::from_secs(3) {
            thread::sleep(Duration::from_millis(50));
        }
        for p in self.processes() {
            if !procs.iter().any(|q| q.pid == p.pid) {
                procs.push(p);
            }
        }
        let left = still(&procs);
        if !left.is_empty() {
            let list: Vec<String> = left.iter().map(|p| p.pid.to_string()).collect();
            errors.push(format!(
                "killed processes of dockerd of host {} left after it stopped: {}",
                self.host,
                list.join(" ")
            ));
            for p in &left {
                kill_same(*p, libc::SIGKILL);
            }
            let t0 = Instant::now();
            while !still(&left).is_empty() && t0.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(20));
            }
            let stuck = still(&left);
            if !stuck.is_empty() {
                errors.push(format!("processes still there 5 s after SIGKILL: {stuck:?}"));
            }
        }
        // Releasing the namespace unmounts its tmpfs and nsfs mounts.
        self.mnt_ns = None;
        errors
    }

    /// Stops dockerd (SIGTERM, SIGKILL after 20 s) and starts it again with the same
    /// directories (containers with a restart policy come back, networks stay). Does not remove
    /// containers. Also starts a stopped dockerd ([`Dockerd::stop`]).
    ///
    /// dockerd stops each running container first, waiting its stop timeout (10 s) for one whose
    /// PID 1 ignores SIGTERM, as `sleep` does: run such containers with `--init` (docker-init
    /// passes the signal on) or `--stop-timeout 1` to keep a restart at about 2 s.
    pub fn restart(&mut self) -> Result<()> {
        let errors = self.shutdown(STOP_GRACE, false);
        if !errors.is_empty() {
            eprintln!("weft-lab dockerd h{}: stopping for restart: {}", self.host, errors.join("; "));
        }
        self.launch()
    }

    /// Stops dockerd as [`Dockerd::restart`] does, without starting it again (its containers are
    /// stopped by dockerd; data is kept). Errors if it did not stop by SIGTERM or left processes.
    pub fn stop(&mut self) -> Result<()> {
        let errors = self.shutdown(STOP_GRACE, false);
        if !errors.is_empty() {
            bail!("stopping dockerd of host {}: {}", self.host, errors.join("; "));
        }
        Ok(())
    }

    /// Whether dockerd is running (started and not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `/usr/bin/docker <args>` against this dockerd (`DOCKER_HOST`), returning its output
    /// whatever the exit status; killed (by PID) after 60 s.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        self.docker_timeout(args, CLI_TIMEOUT)
    }

    /// [`Dockerd::docker`] with another limit.
    pub fn docker_timeout(&self, args: &[&str], limit: Duration) -> Result<Output> {
        let mut cmd = Command::new(DOCKER_CLI);
        self.client_env(&mut cmd);
        cmd.args(args);
        run(&mut cmd, limit)
    }

    /// Runs `docker <args>`; its stdout, trimmed, if it exits 0, else an error with its stderr.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        if !out.status.success() {
            bail!(
                "`docker {}` on host {} failed ({}): {}",
                args.join(" "),
                self.host,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `/usr/bin/docker-compose <args>` in `project_dir` against this dockerd, returning
    /// its output whatever the exit status; killed (by PID) after 60 s.
    pub fn compose(&self, project_dir: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(DOCKER_COMPOSE);
        self.client_env(&mut cmd);
        cmd.current_dir(project_dir).args(args);
        run(&mut cmd, CLI_TIMEOUT)
    }

    /// Like [`Dockerd::compose`]; trimmed stdout if it exits 0, else an error with its stderr.
    pub fn compose_ok(&self, project_dir: &Path, args: &[&str]) -> Result<String> {
        let out = self.compose(project_dir, args)?;
        if !out.status.success() {
            bail!(
                "`docker-compose {}` in {} on host {} failed ({}): {}",
                args.join(" "),
                project_dir.display(),
                self.host,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `DOCKER_HOST` and a private `DOCKER_CONFIG`; drops other settings that would redirect it.
    fn client_env(&self, cmd: &mut Command) {
        cmd.env("DOCKER_HOST", self.docker_host())
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env_remove("DOCKER_CERT_PATH");
    }

    /// The PID of container `name_or_id`'s first process (`State.Pid`); errors if not running.
    pub fn container_pid(&self, name_or_id: &str) -> Result<u32> {
        let s = self.docker_ok(&["inspect", "--format", "{{.State.Pid}}", name_or_id])?;
        match s.parse::<u32>() {
            Ok(0) => bail!("container {name_or_id} on host {} is not running", self.host),
            Ok(pid) => Ok(pid),
            Err(_) => bail!("`docker inspect` of {name_or_id} gave State.Pid {s:?}"),
        }
    }

    /// `/proc/<pid>/ns/net` of container `name_or_id` (usable from any mount namespace, unlike
    /// its `SandboxKey`).
    pub fn container_netns(&self, name_or_id: &str) -> Result<PathBuf> {
        Ok(PathBuf::from(format!("/proc/{}/ns/net", self.container_pid(name_or_id)?)))
    }

    /// The lab host index.
    pub fn host(&self) -> usize {
        self.host
    }

    /// The lab host's network namespace name (dockerd's network namespace).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// `<lab.dir()>/docker-h<i>`, see the module docs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What dockerd sees as `/run/docker/plugins`: a network plugin serving this host puts its
    /// socket here (e.g. `weft.sock` for driver `weft`).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// dockerd's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://<socket>`, the `DOCKER_HOST` for clients.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// dockerd's PID, `None` once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// dockerd's stdout and stderr, appended across restarts.
    pub fn log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// `--data-root` (removed on drop).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `--config-file`.
    pub fn daemon_json(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    /// [`router_args`] for this host.
    pub fn router_args(&self) -> Vec<String> {
        vec![
            "--docker-socket".into(),
            self.socket().to_string_lossy().into_owned(),
            "--docker-plugin-dir".into(),
            self.plugin_dir().to_string_lossy().into_owned(),
        ]
    }

    /// `/proc/<dockerd pid>/ns/mnt`, for `nsenter --mount=` into dockerd's mount namespace (to
    /// see `/run/docker` or the sandbox netns files as dockerd does); `None` once stopped. It
    /// changes with every (re)start.
    pub fn mount_ns(&self) -> Option<PathBuf> {
        self.pid().map(|p| PathBuf::from(format!("/proc/{p}/ns/mnt")))
    }

    /// Gives up responsibility for dockerd without stopping it (simulates a crashed test): the
    /// returned child must still be reaped.
    #[cfg(test)]
    fn abandon(mut self) -> Option<Child> {
        self.mnt_ns = None;
        self.spawned = false;
        self.child.take()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.keep {
            if let Some(pid) = self.pid() {
                eprintln!(
                    "weft-lab: kept dockerd of host {} (pid {pid}; DOCKER_HOST={})",
                    self.host,
                    self.docker_host()
                );
            }
            return;
        }
        let mut errors = self.shutdown(STOP_GRACE, true);
        for sub in ["data", "exec"].into_iter().filter(|_| self.spawned) {
            let p = self.dir.join(sub);
            if let Err(e) = fs::remove_dir_all(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("removing {}: {e}", p.display()));
                }
            }
        }
        for e in errors {
            eprintln!("weft-lab dockerd h{}: cleanup: {e}", self.host);
        }
    }
}

/// `<lab_dir>/busybox-rootfs.tar`, built once: `/bin/busybox` with a symlink per applet at its
/// usual place (`busybox --list-full`), `/etc/passwd` and `/etc/group` with root, `/tmp`, `/root`.
fn busybox_tarball(lab_dir: &Path) -> Result<PathBuf> {
    let _guard = TARBALL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let tar = lab_dir.join("busybox-rootfs.tar");
    if tar.is_file() {
        return Ok(tar);
    }
    let root = lab_dir.join(format!("busybox-rootfs.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let result = (|| -> Result<()> {
        for d in ["bin", "etc", "tmp", "root"] {
            fs::create_dir_all(root.join(d))?;
        }
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
        }
        fs::copy(BUSYBOX, root.join("bin/busybox")).with_context(|| format!("copying {BUSYBOX}"))?;
        let out = run(Command::new(BUSYBOX).arg("--list-full"), Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("`busybox --list-full` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            let applet = applet.trim().trim_start_matches('/');
            if applet.is_empty() || applet.contains("..") || applet == "bin/busybox" {
                continue;
            }
            let link = root.join(applet);
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent)?;
            }
            if !link.exists() {
                std::os::unix::fs::symlink("/bin/busybox", &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")?;
        fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
        let partial = lab_dir.join(format!("busybox-rootfs.tar.tmp{}", std::process::id()));
        let mut cmd = Command::new("tar");
        cmd.args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&partial)
            .arg(".");
        super::checked(&mut cmd)?;
        fs::rename(&partial, &tar)?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&root);
    result.context("building the busybox rootfs tarball")?;
    Ok(tar)
}

/// Whether `path` is an ELF file without a program interpreter (PT_INTERP), i.e. static.
fn is_static_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let Ok(n) = f.read(&mut buf) else {
        return false;
    };
    let buf = &buf[..n];
    // 64-bit little-endian ELF only (what this machine runs).
    if buf.len() < 64 || &buf[..4] != b"\x7fELF" || buf[4] != 2 || buf[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(buf[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phentsize < 4 {
        return false;
    }
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(t) = buf.get(o..o + 4) else {
            return false;
        };
        if u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3 {
            return false; // PT_INTERP: dynamically linked
        }
    }
    true
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
