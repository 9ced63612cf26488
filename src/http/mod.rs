//! The HTTP surface: axum router, auth, metrics, OpenAPI, graceful shutdown.

pub mod connections;
pub mod console;
pub mod error;
pub mod jobs_routes;
pub mod listen;
pub mod openai;
pub mod routes;
pub mod sse;
pub mod state;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

pub use connections::ConnectionLimits;
use error::{ApiError, ErrorKind};
pub use listen::listen;
pub use state::{AppState, HttpMetrics, ServerConfig};

#[derive(OpenApi)]
#[openapi(
    info(title = "tagllm", description = "Tag-LLM tags served on one frozen LLM"),
    paths(routes::health, routes::ready, routes::info, routes::list_tags, routes::get_tag,
          routes::reload_tags, routes::tokenize, routes::predict, routes::metrics,
          jobs_routes::train, jobs_routes::list_jobs, jobs_routes::get_job, jobs_routes::job_curve, jobs_routes::job_events,
          jobs_routes::cancel_job, jobs_routes::upload_dataset,
          openai::list_models, openai::completions, openai::chat_completions),
    // A streamed chat answer's events carry these as JSON text.
    components(schemas(openai::wire::ChatCompletionChunk)),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// Routes anyone may call, keys or not: the probes, the API's description, and the
/// console's and docs' static files (they hold no data; their API calls carry a key).
fn is_open(path: &str) -> bool {
    path == "/health"
        || path == "/ready"
        || path == "/openapi.json"
        || console::is_console_path(path)
}

/// POSTs that only read: they need no admin key.
const READ_ONLY_POSTS: [&str; 4] = [
    "/predict",
    "/tokenize",
    "/v1/completions",
    "/v1/chat/completions",
];

/// Routes that change state need the admin key where one is set.
fn needs_admin(method: &Method, path: &str) -> bool {
    method != Method::GET && !READ_ONLY_POSTS.contains(&path)
}

/// The schemes, and the answers every route shares because of the layers around it
/// (auth, body extraction, readiness), added to each operation so the document lists
/// every status a route can give.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let c = doc.components.get_or_insert_with(Default::default);
        let bearer =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        c.add_security_scheme("api_key", bearer());
        c.add_security_scheme("admin", bearer());
        // The `/v1` routes answer errors in OpenAI's shape.
        let error = |what: &str, schema: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name(schema)))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, op) in [
                (Method::GET, item.get.as_mut()),
                (Method::POST, item.post.as_mut()),
                (Method::DELETE, item.delete.as_mut()),
            ] {
                let Some(op) = op else { continue };
                let schema = if path.starts_with("/v1/") {
                    "OpenAiErrorBody"
                } else {
                    "ErrorBody"
                };
                // Grouped by what a reader came for, not by the module that serves it.
                op.tags = Some(vec![section_of(path).to_string()]);
                // A text body that is not JSON (NDJSON datasets) is bytes to a client, not a
                // JSON string value.
                if let Some(body) = op.request_body.as_mut() {
                    if let Some(c) = body.content.get_mut("application/x-ndjson") {
                        c.schema = Some(
                            utoipa::openapi::ObjectBuilder::new()
                                .schema_type(utoipa::openapi::Type::String)
                                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                                    utoipa::openapi::KnownFormat::Binary,
                                )))
                                .description(Some("NDJSON: one JSON object per line"))
                                .into(),
                        );
                    }
                }
                let mut add = |status: &str, what: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(what, schema).into());
                };
                if op.request_body.is_some() {
                    add("400", "The body is not well-formed (e.g. malformed JSON)");
                    add("413", "The body is over the size limit");
                    add(
                        "415",
                        "The body's Content-Type is not the one this route reads",
                    );
                }
                if path != "/health" && path != "/metrics" {
                    add("503", "The model or the job store is not ready");
                }
                if is_open(path) {
                    continue;
                }
                add("401", "A key is required and none or a wrong one was given");
                // Keys are the server's choice (`--api-key`, `--admin-api-key`): without
                // them every route is open, hence the empty requirement.
                let none = SecurityRequirement::default();
                let scheme = |name: &str| SecurityRequirement::new(name, Vec::<String>::new());
                if needs_admin(&method, path) {
                    add("403", "The route needs the admin key");
                    op.security = Some(vec![scheme("admin"), none]);
                } else {
                    op.security = Some(vec![scheme("api_key"), scheme("admin"), none]);
                }
            }
        }
    }
}

/// The section of the API docs a route belongs to.
fn section_of(path: &str) -> &'static str {
    match path.split('/').nth(1).unwrap_or("") {
        "predict" | "tokenize" => "inference",
        "tags" => "tags",
        "train" | "jobs" | "datasets" => "training",
        "v1" => "openai",
        _ => "service",
    }
}

/// The OpenAPI document as served at `/openapi.json` and checked in at `openapi/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
        serde_json::json!({"error": format!("the OpenAPI document did not serialise: {e}")})
            .to_string()
    })
}

/// The credentials of `Authorization: Bearer <key>`; the scheme's name is
/// case-insensitive (RFC 7235), the key is not.
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim_start())
}

/// `--api-key` guards every route but the probes (`/health`, `/ready`: orchestrators
/// call them without keys, and they reveal nothing); `--admin-api-key` additionally
/// guards everything that changes state.
async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if is_open(path) {
        return next.run(req).await;
    }
    let changes_state = needs_admin(req.method(), path);
    let token = bearer(&req);
    let cfg = &s.config;
    let is = |key: &Option<String>| {
        key.as_deref()
            .is_some_and(|k| token.is_some_and(|t| same_secret(t, k)))
    };
    let allowed = if changes_state && cfg.admin_api_key.is_some() {
        is(&cfg.admin_api_key)
    } else {
        cfg.api_key.is_none() || is(&cfg.api_key) || is(&cfg.admin_api_key)
    };
    if allowed {
        return next.run(req).await;
    }
    let (kind, msg) = if token.is_none() {
        (
            ErrorKind::Unauthorized,
            "missing `Authorization: Bearer <key>`",
        )
    } else if changes_state {
        (ErrorKind::Forbidden, "this route needs the admin API key")
    } else {
        (ErrorKind::Unauthorized, "invalid API key")
    };
    ApiError::new(kind, msg).into_response()
}

async fn observe(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    let secs = started.elapsed().as_secs_f64();
    let status = resp.status();
    let labels = [route.as_str(), status.as_str()];
    s.metrics.requests.with_label_values(&labels).inc();
    s.metrics.latency.with_label_values(&labels).observe(secs);
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/info", get(routes::info))
        .route("/metrics", get(routes::metrics))
        .route("/tags", get(routes::list_tags))
        .route("/tags/reload", post(routes::reload_tags))
        .route("/tags/{name}", get(routes::get_tag))
        .route("/tokenize", post(routes::tokenize))
        .route("/predict", post(routes::predict))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/train", post(jobs_routes::train))
        .route("/jobs", get(jobs_routes::list_jobs))
        .route(
            "/jobs/{id}",
            get(jobs_routes::get_job).delete(jobs_routes::cancel_job),
        )
        .route("/jobs/{id}/curve", get(jobs_routes::job_curve))
        .route("/jobs/{id}/events", get(jobs_routes::job_events))
        .route(
            "/datasets",
            post(jobs_routes::upload_dataset)
                .layer(DefaultBodyLimit::max(state.config.max_dataset_bytes)),
        )
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    openapi_json(),
                )
            }),
        )
        .merge(console::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.config.connections.body_read_timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(error::errors_as_json))
        .layer(middleware::from_fn(openai::errors::in_openai_form))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The shared state, with no model yet: `/health` answers at once, the rest 503 until
/// `state.predictor` is set.
pub fn new_state(config: ServerConfig) -> anyhow::Result<Arc<AppState>> {
    Ok(Arc::new(AppState {
        permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
        config,
        predictor: OnceLock::new(),
        jobs: OnceLock::new(),
        metrics: HttpMetrics::new()?,
        shutdown: tokio::sync::watch::Sender::new(false),
    }))
}

/// Compares a presented key with the configured one in constant time (`subtle`), so
/// response times do not tell how much of a guessed key was right.
fn same_secret(presented: &str, key: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.as_bytes().ct_eq(key.as_bytes()).into()
}

/// Serves until SIGTERM or Ctrl-C, then finishes the requests in flight (event streams
/// end at once).
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> anyhow::Result<()> {
    serve_until(listener, state, crate::shutdown::signal()).await
}

/// Serves until `stop` completes, then ends event streams and finishes requests in flight
/// (within the configured grace period).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let signal = {
        let state = state.clone();
        async move {
            stop.await;
            tracing::info!("shutting down: finishing requests in flight");
            state.shutdown.send_replace(true);
        }
    };
    let limits = state.config.connections.clone();
    connections::serve_connections(listener, router(state), &limits, signal).await;
    Ok(())
}
