//! Errors on the `/v1` routes in OpenAI's shape, `{"error": {message, type, param,
//! code}}`, and the check that refuses a parameter tagllm would otherwise ignore.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::wire::{OpenAiError, OpenAiErrorBody};
use crate::http::error::{ApiError, ErrorBody, ErrorKind};

/// An error on a `/v1` route, with the request field at fault where there is one.
#[derive(Debug)]
pub struct V1Error {
    pub error: ApiError,
    pub param: Option<String>,
    /// OpenAI's code where it has one (`model_not_found`); else the error's kind.
    pub code: Option<&'static str>,
}

impl From<ApiError> for V1Error {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            param: None,
            code: None,
        }
    }
}

impl V1Error {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            error: ApiError::with_status(StatusCode::BAD_REQUEST, ErrorKind::Validation, message),
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            error: ApiError::not_found(format!(
                "the model `{model}` does not exist: GET /v1/models lists the base model \
                 and the tags that generate text"
            )),
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn body(self) -> (StatusCode, OpenAiErrorBody) {
        let status = openai_status(self.error.status);
        let ErrorBody { error, error_type } = self.error.into_body();
        let code = self
            .code
            .map(str::to_string)
            .or_else(|| kind_name(error_type));
        (
            status,
            OpenAiErrorBody {
                error: OpenAiError {
                    message: error,
                    kind: error_class(status).into(),
                    param: self.param,
                    code,
                },
            },
        )
    }
}

impl IntoResponse for V1Error {
    fn into_response(self) -> Response {
        let (status, body) = self.body();
        (status, Json(body)).into_response()
    }
}

/// OpenAI answers a request it cannot serve with 400 where tagllm's own routes say 422.
fn openai_status(status: StatusCode) -> StatusCode {
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    }
}

fn kind_name(kind: ErrorKind) -> Option<String> {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

/// OpenAI's `type` for a status.
fn error_class(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    }
}

/// Rewrites the `{error, error_type}` bodies that the layers around the routes make (auth,
/// body limits, axum's rejections) into OpenAI's shape on `/v1` paths; other paths, and
/// answers already in OpenAI's shape, pass untouched.
pub async fn in_openai_form(req: Request, next: Next) -> Response {
    let is_v1 = req.uri().path().starts_with("/v1/");
    let resp = next.run(req).await;
    let status = resp.status();
    if !is_v1 || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // tagllm's error bodies are short; anything longer is not one of them.
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let parsed: Option<(String, String)> =
        serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
            let message = v.get("error")?.as_str()?.to_string();
            let kind = v.get("error_type")?.as_str()?.to_string();
            Some((message, kind))
        });
    let Some((message, kind)) = parsed else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let status = openai_status(status);
    parts.status = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = OpenAiErrorBody {
        error: OpenAiError {
            message,
            kind: error_class(status).into(),
            param: None,
            code: Some(kind),
        },
    };
    let fresh = Json(body).into_response();
    Response::from_parts(parts, fresh.into_body())
}

/// Request fields that tagllm accepts and has no use for.
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Request fields accepted at the value that changes nothing (so clients that send
/// their defaults work), refused at any other: silently ignoring `logprobs: true` or a
/// penalty would answer a different question than the one asked.
fn is_neutral(key: &str, v: &Value) -> Option<bool> {
    let zero = || v.as_f64() == Some(0.0);
    Some(match key {
        "logprobs" | "echo" => v == &Value::Bool(false),
        "top_logprobs" => zero(),
        "best_of" => v.as_u64() == Some(1),
        "presence_penalty" | "frequency_penalty" => zero(),
        "logit_bias" => v.as_object().is_some_and(|m| m.is_empty()),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        "suffix" => v.as_str() == Some(""),
        _ => return None,
    })
}

/// The body as a JSON object, every field either one `known` to the route, ignored, or
/// neutral; anything else is a 400 naming it. An unknown field that is null counts as
/// absent (the `openai` package never sends them, other clients do); a known one is left
/// for the route's types to judge.
pub fn checked_body(body: &[u8], known: &[&str]) -> Result<Value, V1Error> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        V1Error::from(ApiError::new(
            ErrorKind::BadRequest,
            format!("the body is not valid JSON: {e}"),
        ))
    })?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::new(ErrorKind::BadRequest, "the body must be a JSON object").into());
    };
    map.retain(|k, v| !v.is_null() || known.contains(&k.as_str()));
    for (key, v) in &map {
        if known.contains(&key.as_str()) || IGNORED.contains(&key.as_str()) {
            continue;
        }
        match is_neutral(key, v) {
            Some(true) => {}
            Some(false) => {
                return Err(V1Error::invalid(
                    key,
                    format!("`{key}` = {v} is not supported by this server"),
                ))
            }
            None => {
                return Err(V1Error::invalid(
                    key,
                    format!("unknown or unsupported parameter `{key}`"),
                ))
            }
        }
    }
    map.retain(|k, _| known.contains(&k.as_str()));
    Ok(Value::Object(map))
}
