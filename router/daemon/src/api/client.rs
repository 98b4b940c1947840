//! A small blocking HTTP/1.1 client for the router's local API on its unix
//! socket, used by the `weft` CLI and the `weft-cni` plugin.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

/// Why a call to the router failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens at the socket, or we may not connect to it.
    #[error("{0}")]
    NotRunning(String),
    /// The router answered with an error status.
    #[error("{message}")]
    Answer { status: u16, message: String },
    /// Talking to the router failed half-way, or its answer was malformed.
    #[error("{0:#}")]
    Io(anyhow::Error),
}

/// Sends a request and returns the JSON body of a 2xx answer; an error
/// answer becomes [`CallError::Answer`] carrying the router's message.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
    let s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CallError::NotRunning(format!(
            "no weft router is running (nothing at {}): start one with `weft launch`",
            socket.display()
        )),
        std::io::ErrorKind::PermissionDenied => CallError::NotRunning(format!(
            "permission denied on {}: the weft API is root-only (use sudo)",
            socket.display()
        )),
        _ => CallError::Io(anyhow::Error::new(e).context(format!("connecting to {}", socket.display()))),
    })?;
    exchange(s, method, path, body)
}

fn exchange(mut s: UnixStream, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| CallError::Io(e.into()))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).context("sending the API request").map_err(CallError::Io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the API answer").map_err(CallError::Io)?;
    let (status, v, body) = parse_answer(&raw).map_err(CallError::Io)?;
    if !(200..300).contains(&status) {
        let message = v.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or(body);
        return Err(CallError::Answer { status, message });
    }
    Ok(v)
}

/// (status, JSON body, raw body) of an HTTP answer.
fn parse_answer(raw: &[u8]) -> Result<(u16, Value, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed API answer (no header end)")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed API answer (no status)")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    let v: Value = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(&body).context("API answer is not JSON")? };
    Ok((status, v, body))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(len.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        s = rest.get(n + 2..).unwrap_or("");
    }
}
