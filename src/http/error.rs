//! One JSON error shape, `{error, error_type}`, with a stable `error_type` per status.
//! An internal error's details go to the log under an id; the client gets the id only.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// Stable machine-readable kind: validation, bad_request, unauthorized, forbidden,
    /// not_found, method_not_allowed, payload_too_large, request_timeout, overloaded,
    /// queue_timeout, not_ready, engine_down, shutting_down, backend.
    pub error_type: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
        }
    }
    pub fn validation(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "too many concurrent requests; retry later",
        )
    }
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the model is still loading",
        )
    }
    pub fn backend(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", m)
    }
}

impl ApiError {
    /// The body a client sees. A 500's message may hold anything a library put in an
    /// error (paths, a backtrace): it is logged in full under a fresh id, and the client
    /// gets "internal error" with that id.
    pub fn into_body(self) -> ErrorBody {
        let error = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            let id = uuid::Uuid::new_v4().simple().to_string();
            tracing::error!(error_id = %id, error_type = self.error_type, error = %self.message, "internal error");
            format!("internal error (id {id}; the server's log has its details)")
        } else {
            self.message
        };
        ErrorBody {
            error,
            error_type: self.error_type.to_string(),
        }
    }

    /// A request body that could not be read: the client stalled (408), or sent more
    /// than the limit (413), or its bytes were otherwise unreadable (400).
    fn unreadable_body(
        status: StatusCode,
        text: String,
        cause: &(dyn std::error::Error + 'static),
    ) -> Self {
        let mut source = Some(cause);
        while let Some(e) = source {
            if e.is::<tower_http::timeout::TimeoutError>() {
                return Self::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body stopped arriving before it was complete",
                );
            }
            source = e.source();
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                status,
                "payload_too_large",
                "request body is over the size limit",
            );
        }
        Self::new(status, "bad_request", text)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        (status, Json(self.into_body())).into_response()
    }
}

/// The kind that an error response of `status` made outside tagllm's handlers (axum's
/// own rejections: a bad path segment, a method a route does not have) is given.
fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::UNPROCESSABLE_ENTITY => "validation",
        s if s.is_server_error() => "backend",
        _ => "bad_request",
    }
}

/// Every error answers `{error, error_type}`: an error response that is not JSON (axum's
/// plain-text rejections, an empty 405) is rewritten, keeping its status and headers.
pub async fn errors_as_json(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Rejections' texts are short; anything longer is not a message worth passing on.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let fresh = ApiError::new(status, kind_of(status), message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, fresh.into_body())
}

/// Malformed, oversized or stalled JSON bodies answer in the same shape as every other
/// error.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection;
        let status = r.status();
        match &r {
            JsonRejection::BytesRejection(_) => Self::unreadable_body(status, r.body_text(), &r),
            _ if status == StatusCode::UNPROCESSABLE_ENTITY => Self::validation(r.body_text()),
            _ => Self::new(status, "bad_request", r.body_text()),
        }
    }
}

/// A text body (NDJSON datasets) that could not be read.
impl From<axum::extract::rejection::StringRejection> for ApiError {
    fn from(r: axum::extract::rejection::StringRejection) -> Self {
        Self::unreadable_body(r.status(), r.body_text(), &r)
    }
}

/// A malformed query string (`/jobs?limit=abc`) answers 422 in the same shape too.
impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        Self::validation(r.body_text())
    }
}
