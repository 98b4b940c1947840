//! Network namespaces: naming them, opening them, and doing netlink work inside one.
//!
//! Work that must happen inside another namespace (the container end of a veth pair) runs on a
//! dedicated OS thread that `setns()`s into the namespace and opens its own rtnetlink
//! connection there: `setns` affects only the calling thread, and a netlink socket stays bound
//! to the namespace it was opened in.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use super::netlink::NetDev;

/// Resolves what a user typed for a namespace: a PID, a path, or a name under /run/netns.
pub fn netns_path(spec: &str) -> PathBuf {
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new("/run/netns").join(spec)
    }
}

/// A name under /run/netns (not a path or a PID).
pub fn is_netns_name(spec: &str) -> bool {
    !spec.is_empty() && !spec.contains('/') && !spec.bytes().all(|b| b.is_ascii_digit())
}

/// The namespace behind a path, remembered with an allocation for later clean-up.
pub fn netns_ref(path: &Path) -> Result<weft_ipam::NetnsRef, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("network namespace {}: {e}", path.display()))?;
    Ok(weft_ipam::NetnsRef { path: path.display().to_string(), inode: m.ino() })
}

/// Whether the namespace a reference was taken of still exists (same path, same inode).
pub fn netns_alive(r: &weft_ipam::NetnsRef) -> bool {
    std::fs::metadata(&r.path).map(|m| m.ino() == r.inode).unwrap_or(false)
}

pub(super) fn open_netns(path: &Path) -> Result<File> {
    match File::open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(anyhow!(
            "network namespace {} does not exist: create it first (ip netns add NAME) or pass \
             /proc/PID/ns/net of a running process",
            path.display()
        )),
        Err(e) => {
            Err(e).with_context(|| format!("opening network namespace {} failed", path.display()))
        }
    }
}

/// Runs `f` with a [`NetDev`] opened inside the namespace `ns` (opened from `path`), on a
/// dedicated thread with its own current-thread runtime. The calling task is not blocked.
pub(super) async fn in_netns<T, F, Fut>(ns: &File, path: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(NetDev) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let fd = ns.try_clone().with_context(|| {
        format!(
            "duplicating descriptor of network namespace {}",
            path.display()
        )
    })?;
    let ns_name = path.display().to_string();
    let ns_name2 = ns_name.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            let result = run_in_netns(fd, &ns_name2, f);
            // The receiver only goes away if the caller was cancelled; nothing to report to.
            let _ = tx.send(result);
        })
        .context("spawning a thread for network namespace work failed")?;
    rx.await
        .map_err(|_| anyhow!("the thread working in network namespace {ns_name} died (panicked)"))?
}

fn run_in_netns<T, F, Fut>(fd: File, ns_name: &str, f: F) -> Result<T>
where
    F: FnOnce(NetDev) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    // SAFETY: `fd` is an open descriptor owned by this function; setns changes only the
    // network namespace of this (dedicated, short-lived) thread.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EINVAL) => anyhow!(
                "{ns_name} is not a network namespace (a /run/netns/NAME file that is no longer \
                 mounted? recreate it with ip netns add, or pass /proc/PID/ns/net)"
            ),
            Some(libc::EPERM) => anyhow!(
                "entering network namespace {ns_name} is not permitted: needs CAP_SYS_ADMIN"
            ),
            _ => anyhow::Error::new(err)
                .context(format!("entering network namespace {ns_name} failed")),
        });
    }
    drop(fd);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a runtime for network namespace work failed")?;
    runtime.block_on(async move {
        let nd = NetDev::new()
            .await
            .with_context(|| format!("in network namespace {ns_name}"))?;
        f(nd).await
    })
}
