//! Tests of [`Dockerd`]. They need root and Debian's docker.io, containerd, runc and
//! busybox-static (docker-compose for the compose one) and skip otherwise.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::{cleanup_stale, fresh_id, ip, pid_running, wait_for, LabConfig};

fn ns_inode(path: &str) -> u64 {
    fs::metadata(path).unwrap().ino()
}

/// Prints `docker <args>` output on failure, returns trimmed stdout.
fn ok(d: &Dockerd, args: &[&str]) -> String {
    d.docker_ok(args).unwrap_or_else(|e| panic!("{e:#}\nlast lines of {}:\n{}", d.log().display(), tail(&d.log(), 20)))
}

#[test]
fn docker_two_hosts_smoke() {
    if !require_docker("docker_two_hosts_smoke") {
        return;
    }
    let lab = Lab::new(LabConfig::new(2, "/nonexistent/weft")).unwrap();
    let t0 = Instant::now();
    let ds = Dockerd::start_all(&lab, &[0, 1]).unwrap();
    eprintln!("two dockerds started and {BUSYBOX_IMAGE} imported in {:?}", t0.elapsed());
    let mut pids = Vec::new();
    let mut dirs = Vec::new();
    for d in &ds {
        let h = d.host();
        let host_net = ns_inode(&format!("{NETNS_DIR}/{}", lab.host(h).ns));
        let pid = d.pid().unwrap();
        // dockerd runs in the lab host's network namespace, in a mount namespace of its own.
        assert_eq!(ns_inode(&format!("/proc/{pid}/ns/net")), host_net);
        assert_ne!(ns_inode(&format!("/proc/{pid}/ns/mnt")), ns_inode("/proc/self/ns/mnt"));
        assert_eq!(fs::read_to_string(d.dir().join("docker.pid")).unwrap().trim(), pid.to_string());
        assert!(d.plugin_dir().is_dir() && d.socket().exists() && d.daemon_json().is_file());
        assert_eq!(d.router_args(), router_args(&lab, h));
        assert_eq!(d.dir(), host_dir(&lab, h));
        let t = Instant::now();
        let out = ok(d, &["run", "--rm", BUSYBOX_IMAGE, "sh", "-c", "echo ok; ip -4 -o addr show eth0"]);
        eprintln!("h{h}: docker run --rm took {:?}: {out}", t.elapsed());
        assert!(out.starts_with("ok\n") && out.contains("inet 172.17."), "{out}");
        ok(d, &["run", "-d", "--name", "web", BUSYBOX_IMAGE, "sleep", "30"]);
        let cpid = d.container_pid("web").unwrap();
        let cnet = ns_inode(&format!("/proc/{cpid}/ns/net"));
        assert_ne!(cnet, host_net, "container shares the lab host's netns");
        assert_eq!(d.container_netns("web").unwrap(), PathBuf::from(format!("/proc/{cpid}/ns/net")));
        // docker0 is in the lab host's namespace (not the root one), with its address.
        let br = lab.exec(&lab.host(h).ns, &["ip", "-4", "-o", "addr", "show", "docker0"]).unwrap();
        assert!(String::from_utf8_lossy(&br.stdout).contains("172.17.0.1/16"), "{br:?}");
        // The sandbox netns file is under the exec root, and only a mount point for dockerd.
        let key = ok(d, &["inspect", "--format", "{{.NetworkSettings.SandboxKey}}", "web"]);
        assert!(key.starts_with(&d.dir().join("exec/netns/").to_string_lossy().into_owned()), "{key}");
        let seen = Command::new("nsenter")
            .arg(format!("--mount={}", d.mount_ns().unwrap().display()))
            .args(["stat", "-L", "-c", "%i", &key])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&seen.stdout).trim(), cnet.to_string(), "{seen:?}");
        assert_eq!(fs::metadata(&key).unwrap().len(), 0);
        pids.push((pid, cpid));
        dirs.push(d.dir().to_path_buf());
    }
    // Each dockerd has its own containers.
    assert_eq!(ok(&ds[0], &["ps", "-q"]).lines().count(), 1);
    // The same name on both hosts is fine; the two dockerds share nothing.
    assert_ne!(ok(&ds[0], &["inspect", "-f", "{{.Id}}", "web"]), ok(&ds[1], &["inspect", "-f", "{{.Id}}", "web"]));
    let t = Instant::now();
    drop(ds);
    eprintln!("two dockerds with a running container each dropped in {:?}", t.elapsed());
    for ((pid, cpid), dir) in pids.iter().zip(&dirs) {
        assert!(!pid_running(*pid), "dockerd {pid} survived drop");
        assert!(!pid_running(*cpid), "container process {cpid} survived drop");
        assert!(!dir.join("data").exists(), "{} left", dir.join("data").display());
        assert!(dir.join("dockerd.log").exists());
    }
    // Nothing of the private mount namespaces leaked into ours.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&lab.dir().to_string_lossy().into_owned()), "{mounts}");
    let names = lab.namespaces.clone();
    let dir = lab.dir().to_path_buf();
    drop(lab);
    assert!(names.iter().all(|n| !Path::new(NETNS_DIR).join(n).exists()));
    assert!(!dir.exists());
}

#[test]
fn docker_compose_up_down() {
    if !require_compose("docker_compose_up_down") {
        return;
    }
    let lab = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    let t = Instant::now();
    let d = Dockerd::start(&lab, 0).unwrap();
    eprintln!("one dockerd started and {BUSYBOX_IMAGE} imported in {:?}", t.elapsed());
    let project = lab.dir().join("proj");
    fs::create_dir_all(&project).unwrap();
    fs::write(
        project.join("docker-compose.yml"),
        format!("version: \"2.4\"\nservices:\n  app:\n    image: {BUSYBOX_IMAGE}\n    command: sleep 5\n"),
    )
    .unwrap();
    let t = Instant::now();
    let up = d.compose(&project, &["-p", "smoke", "up", "-d"]).unwrap();
    assert!(up.status.success(), "{up:?}");
    eprintln!("compose up took {:?}", t.elapsed());
    let ps = ok(&d, &["ps", "--format", "{{.Names}} {{.Networks}}"]);
    assert_eq!(ps, "smoke_app_1 smoke_default", "{ps}");
    let running = d.compose_ok(&project, &["-p", "smoke", "ps", "-q"]).unwrap();
    assert_eq!(running.lines().count(), 1, "{running}");
    let down = d.compose(&project, &["-p", "smoke", "down"]).unwrap();
    assert!(down.status.success(), "{down:?}");
    assert_eq!(ok(&d, &["ps", "-aq"]), "");
    assert!(!ok(&d, &["network", "ls", "--format", "{{.Name}}"]).contains("smoke_default"));
    // A failing command comes back as an error with compose's stderr.
    let err = format!("{:#}", d.compose_ok(&project, &["-p", "smoke", "nosuchcommand"]).unwrap_err());
    assert!(err.contains("nosuchcommand"), "{err}");
}

#[test]
fn docker_restart_keeps_networks_and_containers() {
    if !require_docker("docker_restart_keeps_networks_and_containers") {
        return;
    }
    let lab = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    // A test-written daemon.json is used.
    let mut d = Dockerd::start_with(&lab, 0, &serde_json::json!({"labels": ["weft-lab=test"]})).unwrap();
    assert_eq!(ok(&d, &["info", "--format", "{{.Labels}}"]), "[weft-lab=test]");
    // A second Dockerd for the same host is refused, and leaves the first one alone.
    let err = format!("{:#}", Dockerd::start_with(&lab, 0, &serde_json::json!({})).unwrap_err());
    assert!(err.contains("already runs for host 0"), "{err}");
    assert!(fs::read_to_string(d.daemon_json()).unwrap().contains("weft-lab=test"));
    assert!(d.docker(&["info"]).unwrap().status.success());
    ok(&d, &["network", "create", "--subnet", "10.99.0.0/24", "labnet"]);
    // `sleep` as PID 1 ignores SIGTERM, so dockerd would wait 10 s for each on stop: `--init`
    // (docker-init forwards the signal) or `--stop-timeout 1` keep restarts quick.
    ok(&d, &["run", "-d", "--init", "--name", "keep", "--restart", "always", "--network", "labnet", BUSYBOX_IMAGE, "sleep", "300"]);
    ok(&d, &["run", "-d", "--stop-timeout", "1", "--name", "plain", BUSYBOX_IMAGE, "sleep", "300"]);
    let (pid0, cpid0) = (d.pid().unwrap(), d.container_pid("keep").unwrap());
    let t = Instant::now();
    d.restart().unwrap();
    eprintln!("dockerd restart with two running containers took {:?}", t.elapsed());
    assert!(!pid_running(pid0) && !pid_running(cpid0));
    assert_ne!(d.pid().unwrap(), pid0);
    assert!(ok(&d, &["network", "ls", "--format", "{{.Name}}"]).lines().any(|n| n == "labnet"));
    assert!(
        wait_for(Duration::from_secs(20), || d.container_pid("keep").is_ok()),
        "restart=always container not back:\n{}",
        tail(&d.log(), 20)
    );
    let ip = ok(&d, &["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "keep"]);
    assert!(ip.starts_with("10.99.0."), "{ip}");
    assert_eq!(ok(&d, &["inspect", "-f", "{{.State.Running}}", "plain"]), "false");
    // The image survives; no re-import needed.
    ok(&d, &["run", "--rm", BUSYBOX_IMAGE, "true"]);
    // Stop, then restart from stopped.
    d.stop().unwrap();
    assert!(!d.is_running() && d.pid().is_none());
    assert!(d.docker(&["info"]).unwrap().status.code() != Some(0));
    d.restart().unwrap();
    assert!(wait_for(Duration::from_secs(20), || d.container_pid("keep").is_ok()));
    let cpid = d.container_pid("keep").unwrap();
    let pid = d.pid().unwrap();
    let data = d.data_dir();
    drop(d);
    assert!(!pid_running(pid) && !pid_running(cpid) && !data.exists());
}

#[test]
fn docker_bad_daemon_json_fails_with_log() {
    if !require_docker("docker_bad_daemon_json_fails_with_log") {
        return;
    }
    let lab = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    // Conflicts with --storage-driver on the command line: dockerd refuses to start.
    let err = Dockerd::start_with(&lab, 0, &serde_json::json!({"storage-driver": "vfs"})).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("exited during start-up") && err.contains("storage-driver"), "{err}");
}

#[test]
fn docker_stale_lab_is_cleaned_up() {
    if !require_docker("docker_stale_lab_is_cleaned_up") {
        return;
    }
    // A lab of a process that is gone, whose dockerd (with a running container) was never stopped.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let id = format!("wl{dead}x0");
    assert!(fresh_id() != id);
    let ns = format!("{id}-h0");
    let lab_dir = PathBuf::from(format!("/tmp/weft-lab-{id}"));
    ip(&["netns", "add", &ns]).unwrap();
    ip(&["-n", &ns, "link", "set", "lo", "up"]).unwrap();
    let mut d = Dockerd::unstarted(ns.clone(), &lab_dir, 0, false).unwrap();
    fs::write(d.daemon_json(), "{}").unwrap();
    d.launch().unwrap();
    d.ensure_image().unwrap();
    ok(&d, &["run", "-d", "--name", "left", BUSYBOX_IMAGE, "sleep", "300"]);
    let cpid = d.container_pid("left").unwrap();
    let mut child = d.abandon().unwrap();
    let pid = child.id();
    cleanup_stale().unwrap();
    assert!(wait_timeout(&mut child, Duration::from_secs(5)).unwrap().is_some(), "dockerd {pid} not killed");
    assert!(wait_for(Duration::from_secs(5), || !pid_running(cpid)), "container process {cpid} not killed");
    assert!(!Path::new(NETNS_DIR).join(&ns).exists());
    assert!(!lab_dir.exists());
}

#[test]
fn static_elf_check() {
    assert!(!is_static_elf(Path::new("/nonexistent")));
    assert!(!is_static_elf(Path::new("/etc/passwd")));
    // /bin/sh is dynamically linked on Debian.
    if Path::new("/bin/sh").exists() {
        assert!(!is_static_elf(Path::new("/bin/sh")));
    }
    if Path::new(BUSYBOX).exists() && require_docker("static_elf_check") {
        assert!(is_static_elf(Path::new(BUSYBOX)));
    }
}
