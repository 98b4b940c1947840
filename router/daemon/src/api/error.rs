//! The API's one error type: an HTTP status and a message a person can act on, with a `kind`
//! for scripts where there is one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use weft_ipam::FailureKind;

use crate::control::handle::Stopping;
use crate::services::dns::DnsError;
use crate::services::ipam::IpamError;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What failed and what to do.
    pub message: String,
    /// A word for scripts (`"save_failed"`, an IPAM failure kind), if any.
    pub kind: Value,
}

/// What a handler returns.
pub type ApiResult = Result<Json<Value>, ApiError>;

impl ApiError {
    /// An error with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind: Value::Null }
    }
}

/// 400: the request is wrong.
pub fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

/// 500: something on this host failed.
pub fn internal(e: anyhow::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if !self.kind.is_null() {
            body["kind"] = self.kind;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<Stopping> for ApiError {
    fn from(e: Stopping) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

/// 400 for a bad request, 409 when the address is taken or the range is full, 503 when waiting
/// longer, reconnecting a peer or freeing disk space may help.
impl From<IpamError> for ApiError {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::Refused(f) => {
                let status = match f.kind {
                    FailureKind::Invalid => StatusCode::BAD_REQUEST,
                    FailureKind::InUse | FailureKind::Exhausted => StatusCode::CONFLICT,
                    FailureKind::Unreachable | FailureKind::Timeout => StatusCode::SERVICE_UNAVAILABLE,
                };
                ApiError { status, message: f.message, kind: json!(f.kind) }
            }
            IpamError::Save(s) => ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: s.to_string(), kind: json!("save_failed") },
        }
    }
}

impl From<DnsError> for ApiError {
    fn from(e: DnsError) -> Self {
        match e {
            DnsError::Invalid(m) => bad(m),
            DnsError::Save(s) => ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: s.to_string(), kind: json!("save_failed") },
        }
    }
}
