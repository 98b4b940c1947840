//! `weft setup-docker`: points dockerd's resolvers at weft DNS, in its `daemon.json`.
//!
//! Docker's embedded resolver answers the names of containers on the same host and network and
//! asks the daemon's `dns` servers for every other name; with weft DNS first there, a
//! container on a weft network resolves the names of containers on other hosts. Nothing else
//! in the file changes; the change is printed, and dockerd must be restarted to read it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_router::host::identity::write_atomic_mode;

/// What the file holds now with weft's name server first in `dns`, and whether that changed it.
pub(crate) fn with_nameserver(current: &Value, nameserver: &str) -> Result<(Value, bool)> {
    let mut v = current.clone();
    let Some(obj) = v.as_object_mut() else { bail!("it is not a JSON object") };
    let mut dns: Vec<Value> = match obj.get("dns") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => bail!("its \"dns\" is {other}, not a list of addresses"),
    };
    if dns.first().and_then(Value::as_str) == Some(nameserver) {
        return Ok((v, false));
    }
    dns.retain(|d| d.as_str() != Some(nameserver));
    dns.insert(0, json!(nameserver));
    obj.insert("dns".into(), Value::Array(dns));
    Ok((v, true))
}

/// Reads `path` (an absent file is `{}`), puts the name server first, writes it back atomically.
/// Returns what was there and what is there now.
pub(crate) fn setup_docker(path: &Path, nameserver: &str) -> Result<Value> {
    let before: Value = match std::fs::read(path) {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => json!({}),
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not JSON: fix it first", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({}),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (after, changed) = with_nameserver(&before, nameserver).with_context(|| format!("{} cannot take weft's name server", path.display()))?;
    if changed {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut text = serde_json::to_string_pretty(&after)?;
        text.push('\n');
        write_atomic_mode(path, text.as_bytes(), 0o644).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(json!({ "file": path.display().to_string(), "changed": changed, "dns_before": before.get("dns"), "dns": after["dns"], "nameserver": nameserver }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nameserver_goes_first_and_nothing_else_changes() {
        let (v, changed) = with_nameserver(&json!({"storage-driver": "vfs"}), "10.32.0.1").unwrap_or_default();
        assert!(changed);
        assert_eq!(v, json!({"storage-driver": "vfs", "dns": ["10.32.0.1"]}));
        let (v2, changed) = with_nameserver(&v, "10.32.0.1").unwrap_or_default();
        assert!(!changed);
        assert_eq!(v2, v);
        let (v3, _) = with_nameserver(&json!({"dns": ["1.1.1.1", "10.32.0.1"]}), "10.32.0.1").unwrap_or_default();
        assert_eq!(v3["dns"], json!(["10.32.0.1", "1.1.1.1"]));
        assert!(with_nameserver(&json!({"dns": "8.8.8.8"}), "10.32.0.1").is_err());
        assert!(with_nameserver(&json!([1]), "10.32.0.1").is_err());
    }
}
