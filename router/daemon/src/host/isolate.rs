//! Networks do not meet through the host: once the host has an address on a named network's
//! bridge (the gateway of a Docker network), a container there could send packets for another
//! network to the host's MAC and have the kernel route them over. One nftables table, `inet
//! weft_isolate`, drops forwarded packets that come in on one weft bridge and go out of another
//! (the default bridge included). Packets to the host itself, to the world outside and within
//! one bridge pass; drops are counted (`crossed`).

use super::nft;

/// The table's name.
pub const TABLE: &str = "weft_isolate";

/// The table with the default bridge as its first member.
pub fn base_script(default_bridge: &str) -> String {
    let t = format!("inet {TABLE}");
    format!(
        "add table {t}\n\
         add set {t} bridges {{ type ifname; }}\n\
         add set {t} same {{ type ifname . ifname; }}\n\
         add counter {t} crossed\n\
         add chain {t} forward {{ type filter hook forward priority -5; policy accept; }}\n\
         flush chain {t} forward\n\
         add rule {t} forward iifname != @bridges accept\n\
         add rule {t} forward oifname != @bridges accept\n\
         add rule {t} forward iifname . oifname @same accept\n\
         add rule {t} forward counter name crossed drop\n\
         {}",
        member_script(default_bridge, true)
    )
}

/// Adds (or takes out) a bridge.
pub fn member_script(bridge: &str, add: bool) -> String {
    let t = format!("inet {TABLE}");
    let verb = if add { "add" } else { "delete" };
    format!("{verb} element {t} bridges {{ \"{bridge}\" }}\n{verb} element {t} same {{ \"{bridge}\" . \"{bridge}\" }}\n")
}

/// Makes the table (again: its rules are replaced, its members kept).
pub async fn init(default_bridge: &str) -> Result<(), String> {
    nft::run(&base_script(default_bridge)).await
}

/// A named network's bridge joins (`add`) or leaves.
pub async fn member(bridge: &str, add: bool) -> Result<(), String> {
    match nft::run(&member_script(bridge, add)).await {
        Err(e) if !add && nft::is_missing(&e) => Ok(()),
        r => r,
    }
}

/// Packets dropped so far.
pub async fn crossed() -> Option<u64> {
    let out = nft::output(&["-j", "list", "counter", "inet", TABLE, "crossed"], "").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v["nftables"].as_array()?.iter().find_map(|i| i["counter"]["packets"].as_u64())
}
