//! What handlers share to carry out a request: the caller's time-out, and file-system work run
//! off the async workers.

use std::time::Duration;


use super::error::{internal, ApiError};
use crate::services::ipam::invalid;

/// Longest an API caller may ask to wait.
const MAX_WAIT: f64 = 600.0;

/// The caller's `timeout_seconds` (default 30 s, at most 600 s).
pub fn wait_time(secs: Option<f64>) -> Result<Duration, ApiError> {
    let s = secs.unwrap_or(30.0);
    if !(0.0..=MAX_WAIT).contains(&s) {
        return Err(invalid(format!("timeout_seconds must be between 0 and {MAX_WAIT}")).into());
    }
    Ok(Duration::from_secs_f64(s))
}

/// Runs file-system work (stat, resolv.conf) on a thread that may block.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(anyhow::anyhow!("a blocking task failed: {e}")))
}
