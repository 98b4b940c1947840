//! Kernel settings under /proc/sys.

use std::io;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tracing::debug;

use super::netlink::check_ifname;

/// Writes /proc/sys/net/ipv6/conf/<ifname>/disable_ipv6 = 1 (ignore absence of IPv6 support with Ok).
///
/// Acts on the calling thread's network namespace.
pub fn disable_ipv6(ifname: &str) -> Result<()> {
    check_ifname(ifname)?;
    if !Path::new("/proc/sys/net/ipv6").exists() {
        debug!(ifname, "no IPv6 support in this kernel: nothing to disable");
        return Ok(());
    }
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, b"1") {
        Ok(()) => {
            debug!(ifname, "IPv6 disabled");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(anyhow!(
            "cannot disable IPv6 on {ifname}: {path} does not exist (does the interface exist in this network namespace?)"
        )),
        Err(e) => Err(e).with_context(|| format!("writing 1 to {path} failed")),
    }
}

/// Makes `ifname`'s IPv6 link-local the EUI-64 one (addr_gen_mode 0), which the port guard
/// expects, before the interface goes up. Without IPv6 there is nothing to do.
///
/// Acts on the calling thread's network namespace.
pub fn link_local_from_mac(ifname: &str) -> Result<()> {
    check_ifname(ifname)?;
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/addr_gen_mode");
    match std::fs::write(&path, b"0") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("writing 0 to {path} failed")),
    }
}
