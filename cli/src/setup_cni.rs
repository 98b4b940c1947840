//! `weft setup-cni`: installs the CNI plugin and a network configuration.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_router::host::identity::write_atomic_mode;

use crate::SetupCniArgs;

/// The plugin's file name (and its `type` in configurations).
pub(crate) const PLUGIN: &str = "weft-cni";

/// The network configuration list for `network`.
///
/// `cniVersion` 1.0.0 is what every current runtime reads; runtimes whose
/// libcni knows `cniVersions` pick 1.1.0 from it, which brings GC and STATUS.
pub(crate) fn conflist(network: &str, socket: &Path, subnet: Option<&str>, portmap: bool) -> Value {
    let mut weft = json!({
        "type": PLUGIN,
        "socket": socket.display().to_string(),
        "capabilities": { "aliases": true },
    });
    if let Some(s) = subnet {
        weft["subnet"] = json!(s);
    }
    let mut plugins = vec![weft];
    if portmap {
        plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }));
    }
    json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": network,
        "plugins": plugins,
    })
}

/// Copies the plugin and writes the configuration, each atomically (a
/// temporary file in the same directory, synced, then renamed: see
/// `write_atomic_mode`), so a runtime never runs half a binary or reads half a file.
pub(crate) fn setup_cni(a: &SetupCniArgs, socket: &Path) -> Result<Value> {
    if !weft_router::services::cni::is_valid_name(&a.network) {
        bail!("network name {:?} is not valid for CNI: use letters, digits, '_', '.' and '-'", a.network);
    }
    if let Some(s) = &a.subnet {
        let (ip, prefix) = s.split_once('/').with_context(|| format!("subnet {s:?} is not a CIDR (e.g. 10.32.1.0/24)"))?;
        let ok = ip.parse::<std::net::Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32);
        if !ok {
            bail!("subnet {s:?} is not an IPv4 CIDR (e.g. 10.32.1.0/24)");
        }
    }
    let plugin = match &a.plugin {
        Some(p) => p.clone(),
        None => {
            let me = std::env::current_exe().context("finding the weft binary's directory")?;
            me.with_file_name(PLUGIN)
        }
    };
    let bytes = fs::read(&plugin).with_context(|| {
        format!("reading the plugin {}: build it (cargo build --release -p weft-cni) or pass --plugin PATH", plugin.display())
    })?;
    for d in [&a.bin_dir, &a.conf_dir] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let bin = a.bin_dir.join(PLUGIN);
    write_atomic_mode(&bin, &bytes, 0o755)?;
    let conf = a.conf_dir.join(format!("10-{}.conflist", a.network));
    let text = serde_json::to_string_pretty(&conflist(&a.network, socket, a.subnet.as_deref(), a.portmap))? + "\n";
    write_atomic_mode(&conf, text.as_bytes(), 0o644)?;
    Ok(json!({ "plugin": bin.display().to_string(), "conflist": conf.display().to_string(), "network": a.network }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn conflist_shape() {
        let c = conflist("weft", Path::new("/run/weft/weft.sock"), Some("10.32.1.0/24"), true);
        assert_eq!(c["name"], "weft");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["plugins"][0]["type"], PLUGIN);
        assert_eq!(c["plugins"][0]["socket"], "/run/weft/weft.sock");
        assert_eq!(c["plugins"][0]["subnet"], "10.32.1.0/24");
        assert_eq!(c["plugins"][1]["type"], "portmap");
        let c = conflist("weft", Path::new("/s"), None, false);
        assert_eq!(c["plugins"].as_array().map(Vec::len), Some(1));
        assert!(c["plugins"][0].get("subnet").is_none());
    }

    #[test]
    fn installs_atomically_and_refuses_bad_input() {
        let dir = std::env::temp_dir().join(format!("weft-setup-cni-{}", std::process::id()));
        let plugin = dir.join("src-plugin");
        fs::create_dir_all(&dir).expect("dir");
        fs::write(&plugin, b"#!/bin/sh\n").expect("plugin");
        let mut a = SetupCniArgs {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            plugin: Some(plugin.clone()),
            network: "weft".into(),
            socket: None,
            subnet: None,
            portmap: false,
        };
        let v = setup_cni(&a, Path::new("/run/weft/weft.sock")).expect("setup");
        let bin = dir.join("bin").join(PLUGIN);
        assert_eq!(v["plugin"], bin.display().to_string());
        assert_eq!(fs::metadata(&bin).expect("bin").permissions().mode() & 0o777, 0o755);
        let conf: Value = serde_json::from_slice(&fs::read(dir.join("net.d/10-weft.conflist")).expect("conf")).expect("json");
        assert_eq!(conf["plugins"][0]["type"], PLUGIN);
        // Running it again replaces both; no temporary files stay behind.
        setup_cni(&a, Path::new("/run/weft/weft.sock")).expect("again");
        let leftovers = fs::read_dir(dir.join("bin")).expect("ls").count() + fs::read_dir(dir.join("net.d")).expect("ls").count();
        assert_eq!(leftovers, 2);
        a.network = "bad name".into();
        assert!(setup_cni(&a, Path::new("/s")).is_err());
        a.network = "weft".into();
        a.subnet = Some("10.32.1.0".into());
        assert!(setup_cni(&a, Path::new("/s")).is_err());
        a.subnet = None;
        a.plugin = Some(dir.join("missing"));
        let e = setup_cni(&a, Path::new("/s")).expect_err("missing plugin");
        assert!(format!("{e:#}").contains("--plugin"), "{e:#}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
