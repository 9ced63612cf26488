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
    /// Stable machine-readable kind.
    pub error_type: ErrorKind,
}

/// Every kind of error the API answers, each with the status it is usually given (a
/// rejection that axum or a body reader made keeps the status it came with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 422: the request is well-formed but names something wrong (the message says what).
    Validation,
    /// 400 (or 415): the request is not well-formed.
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    /// 409: the state of what it names does not allow it (a job already ended).
    Conflict,
    PayloadTooLarge,
    /// 408: the body stopped arriving.
    RequestTimeout,
    /// 429: over capacity; `Retry-After` says when to come back.
    Overloaded,
    /// 503: queued past its deadline.
    QueueTimeout,
    /// 503: the model is loading, or training is not enabled.
    NotReady,
    /// 503: the inference engine is restarting after a fault.
    EngineDown,
    /// 503: the server is shutting down.
    ShuttingDown,
    /// 500: internal; the log has the details under the message's id.
    Backend,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Validation => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::QueueTimeout | Self::NotReady | Self::EngineDown | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Backend => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The kind of an error response of `status` made outside tagllm's handlers (axum's
    /// own rejections: a bad path segment, a method a route does not have).
    fn of_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::REQUEST_TIMEOUT => Self::RequestTimeout,
            StatusCode::UNPROCESSABLE_ENTITY => Self::Validation,
            s if s.is_server_error() => Self::Backend,
            _ => Self::BadRequest,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    /// An error of `kind`, with its usual status.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::with_status(kind.status(), kind, message)
    }
    /// An error whose status is not its kind's usual one (a rejection's own).
    pub fn with_status(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
    pub fn validation(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn overloaded() -> Self {
        Self::new(
            ErrorKind::Overloaded,
            "too many concurrent requests; retry later",
        )
    }
    pub fn not_ready() -> Self {
        Self::new(ErrorKind::NotReady, "the model is still loading")
    }
    pub fn backend(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backend, m)
    }

    /// The body a client sees. A 500's message may hold anything a library put in an
    /// error (paths, a backtrace): it is logged in full under a fresh id, and the client
    /// gets "internal error" with that id.
    pub fn into_body(self) -> ErrorBody {
        let error = if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            let id = uuid::Uuid::new_v4().simple().to_string();
            tracing::error!(error_id = %id, error_type = ?self.kind, error = %self.message, "internal error");
            format!("internal error (id {id}; the server's log has its details)")
        } else {
            self.message
        };
        ErrorBody {
            error,
            error_type: self.kind,
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
                    ErrorKind::RequestTimeout,
                    "the request body stopped arriving before it was complete",
                );
            }
            source = e.source();
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::new(
                ErrorKind::PayloadTooLarge,
                "request body is over the size limit",
            );
        }
        Self::with_status(status, ErrorKind::BadRequest, text)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        (status, Json(self.into_body())).into_response()
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
    let fresh =
        ApiError::with_status(status, ErrorKind::of_status(status), message).into_response();
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
            _ => Self::with_status(status, ErrorKind::BadRequest, r.body_text()),
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
