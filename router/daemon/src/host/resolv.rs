//! resolv.conf files for named network namespaces (`/etc/netns/NAME/resolv.conf`, which
//! `ip netns exec NAME` shows as /etc/resolv.conf), pointing containers at weft DNS.
//!
//! These write files and fsync: call them from a thread that may block.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::identity::write_atomic;

/// First line of the resolv.conf files weft writes (and may remove).
const RESOLV_MARK: &str = "# written by weft";

/// Writes the namespace's resolv.conf pointing at `server` with `domain` as search domain,
/// unless someone else wrote one. Returns whether it wrote it.
pub fn write_resolv_conf(netns_name: &str, server: IpAddr, domain: &str) -> Result<bool> {
    let dir = Path::new("/etc/netns").join(netns_name);
    let file = dir.join("resolv.conf");
    if let Ok(old) = std::fs::read_to_string(&file) {
        if !old.starts_with(RESOLV_MARK) {
            return Ok(false);
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let body = format!(
        "{RESOLV_MARK}: names under {d} come from weft DNS, the rest is forwarded to the host's resolvers\nnameserver {server}\nsearch {d}\n",
        d = domain.trim_end_matches('.')
    );
    write_atomic(&file, body.as_bytes())?;
    Ok(true)
}

/// Removes a resolv.conf weft wrote for a named namespace.
pub fn remove_resolv_conf(netns_name: &str) {
    let dir = Path::new("/etc/netns").join(netns_name);
    let file = dir.join("resolv.conf");
    if std::fs::read_to_string(&file).is_ok_and(|s| s.starts_with(RESOLV_MARK)) {
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(&dir);
    }
}
