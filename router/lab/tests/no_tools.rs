//! The lab on a bare machine: PATH narrowed to a directory of symlinks to a few tools, so there
//! is no `ping`, `dig` or `nft`. PATH is process-global, which is why these tests have their own
//! test binary (process); within it each takes its turn (`turn()`) before it even reads PATH.
#![allow(clippy::unwrap_used)]

#[path = "common/fake_weft.rs"]
mod fake_weft;

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use fake_weft::{Fake, FAKE_WEFT_TOOLS};
use weft_lab::{demo, require_lab, Lab, LabConfig};

static PATH_LOCK: Mutex<()> = Mutex::new(());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Holds PATH for one test: take it first, keep it to the end.
fn turn() -> MutexGuard<'static, ()> {
    PATH_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// While alive, the process's PATH is one fresh directory holding symlinks to `tools` (those
/// found in the old PATH); drop restores PATH and removes the directory. Only while holding
/// [`turn`].
struct BarePath {
    dir: PathBuf,
    old: Option<OsString>,
}

impl BarePath {
    fn new(_turn: &MutexGuard<'static, ()>, tools: &[&str]) -> BarePath {
        let old = std::env::var_os("PATH");
        // named like a lab's temp dir, so cleanup_stale removes it if this process dies
        let n = 1_000_000 + COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/weft-lab-wl{}x{n}-path", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for tool in tools {
            let link = dir.join(tool);
            if link.exists() {
                continue; // named twice
            }
            if let Some(found) = which(tool, old.as_deref()) {
                std::os::unix::fs::symlink(found, link).unwrap();
            }
        }
        std::env::set_var("PATH", &dir);
        BarePath { dir, old }
    }

    fn has(&self, tool: &str) -> bool {
        self.dir.join(tool).exists()
    }
}

impl Drop for BarePath {
    fn drop(&mut self) {
        match &self.old {
            Some(p) => std::env::set_var("PATH", p),
            None => std::env::remove_var("PATH"),
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

#[test]
fn demo_runs_without_ping_or_dig() {
    let turn = turn();
    if !require_lab("demo_runs_without_ping_or_dig", &FAKE_WEFT_TOOLS) {
        return;
    }
    let _ = weft_lab::cleanup_stale();
    let mut tools = vec!["ip", "nsenter", "nft"];
    tools.extend(FAKE_WEFT_TOOLS);
    let bare = BarePath::new(&turn, &tools);
    for t in &tools {
        assert!(bare.has(t), "{t} not linked");
    }
    assert!(!bare.has("ping") && !bare.has("dig"));
    let fake = Fake::new();
    let mut out = Vec::new();
    demo(LabConfig::new(3, &fake.0), &mut out)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");
    fake_weft::assert_demo_output(&text);
}

/// Routers guard container ports with nft, so a lab without it stops before making anything,
/// naming the package.
#[test]
fn a_lab_without_nft_names_nftables() {
    let turn = turn();
    if !require_lab("a_lab_without_nft_names_nftables", &[]) {
        return;
    }
    let _bare = BarePath::new(&turn, &["ip", "nsenter"]);
    let err = match Lab::new(LabConfig::new(2, "/nonexistent/weft")) {
        Ok(_) => panic!("a lab was made without nft"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("the lab needs `nft` from nftables: apt-get install nftables"), "{err}");
}

/// Needs no root: the tool check comes before the root check and makes nothing.
#[test]
fn lab_new_without_ip_or_nsenter_names_the_package() {
    let turn = turn();
    {
        let _bare = BarePath::new(&turn, &["nsenter"]);
        let err = format!(
            "{:#}",
            Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap_err()
        );
        assert!(
            err.contains("the lab needs `ip` from iproute2: apt-get install iproute2"),
            "{err}"
        );
    }
    let bare = BarePath::new(&turn, &["ip"]);
    if !bare.has("ip") {
        eprintln!("lab_new_without_ip_or_nsenter_names_the_package: no `ip` here; the nsenter half skipped");
        return;
    }
    let err = format!(
        "{:#}",
        Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap_err()
    );
    assert!(
        err.contains("the lab needs `nsenter` from util-linux: apt-get install util-linux"),
        "{err}"
    );
}

/// Docker tests skip (with a message naming the package) rather than fail where dockerd cannot
/// be started in its own mount namespace (no `unshare`); needs no root.
#[test]
fn docker_without_unshare_is_unavailable() {
    let turn = turn();
    let _bare = BarePath::new(&turn, &["ip", "nsenter", "tar"]);
    assert!(!weft_lab::docker::docker_available());
    assert!(!weft_lab::docker::require_docker("docker_without_unshare_is_unavailable"));
}
