//! The `nft` command (Debian package nftables), fed a script on standard input. Each call is one
//! transaction: all of the script applies or none of it. It runs in the calling thread's network
//! namespace, which is how tests and namespaced routers get their own tables.

use std::time::Duration;

/// Runs `script` with `nft -f -`; the error carries nft's message.
pub async fn run(script: &str) -> Result<(), String> {
    output(&[], script).await.map(|_| ())
}

/// Runs `nft ARGS -f -` with `script` on its input, or `nft ARGS` alone when the script is
/// empty (nft 1.0.6 prints no JSON for commands read from a file), and returns what it printed.
pub async fn output(args: &[&str], script: &str) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let from_stdin: &[&str] = if script.is_empty() { &[] } else { &["-f", "-"] };
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .args(from_stdin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running nft (install the Debian package nftables): {e}"))?;
    if let Some(mut i) = child.stdin.take().filter(|_| !script.is_empty()) {
        i.write_all(script.as_bytes()).await.map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .map_err(|_| "nft did not finish within 10 s".to_string())?
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether nft's error says the object was not there.
pub fn is_missing(err: &str) -> bool {
    err.contains("No such file or directory")
}
