//! The service around the engine: readiness, keys, engine faults, disconnects, info and
//! metrics, admission.

use crate::common::server::{start, Options};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tagllm::infer::Input;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_model_is_loaded() {
    let s = start(Options {
        load: false,
        ..Default::default()
    })
    .await;
    let (status, _) = get(&s.url, "/health").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = get(&s.url, "/ready").await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "loading",
    );
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"template": "{x}", "inputs": ["a"]}),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "loading",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_routes_and_admin_key_guards_changes() {
    let config = tagllm::http::ServerConfig {
        api_key: Some("user-key".into()),
        admin_api_key: Some("admin-key".into()),
        max_concurrent_requests: 8,
        max_body_bytes: 1 << 20,
        max_dataset_bytes: 1 << 20,
        ..Default::default()
    };
    let s = start(Options {
        config,
        ..Default::default()
    })
    .await;
    let c = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut r = c.request(method, format!("{}{path}", s.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    use reqwest::Method;
    for probe in ["/health", "/ready"] {
        assert_eq!(
            call(Method::GET, probe, None).await.unwrap().status(),
            StatusCode::OK,
            "{probe} needs no key"
        );
    }
    // The console, the docs and the API's description hold no data: open, so a browser
    // can load them and then ask for the key. Their pages may not be framed.
    for (page, kind) in [
        ("/", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
        ("/docs", "text/html"),
        ("/docs/docs.js", "text/javascript"),
        ("/docs/swagger-ui-bundle.js", "text/javascript"),
        ("/docs/swagger-ui.css", "text/css"),
        ("/openapi.json", "application/json"),
    ] {
        let r = call(Method::GET, page, None).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{page} needs no key");
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(content_type.starts_with(kind), "{page}: {content_type}");
        if page != "/openapi.json" {
            let csp = r.headers()["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("frame-ancestors 'none'"), "{page}: {csp}");
        }
        assert!(!r.bytes().await.unwrap().is_empty(), "{page}");
    }
    // ...but nothing else around them is.
    for path in ["/console", "/console/other.js", "/docs/other"] {
        let r = call(Method::GET, path, None).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let r = call(Method::GET, "/tags", None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_type"],
        "unauthorized"
    );
    assert_eq!(
        call(Method::GET, "/tags", Some("wrong"))
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(Method::GET, "/tags", Some("user-key"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // The scheme's name is case-insensitive (RFC 7235); the key is not.
    for (header, want) in [
        ("bearer user-key", StatusCode::OK),
        ("BEARER user-key", StatusCode::OK),
        ("Bearer  user-key", StatusCode::OK),
        ("Bearer USER-KEY", StatusCode::UNAUTHORIZED),
        ("Basic user-key", StatusCode::UNAUTHORIZED),
        ("Bearer", StatusCode::UNAUTHORIZED),
        ("user-key", StatusCode::UNAUTHORIZED),
    ] {
        let r = c
            .get(format!("{}/tags", s.url))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{header}");
    }
    let r = call(Method::POST, "/tags/reload", Some("user-key"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.json::<Value>().await.unwrap()["error_type"], "forbidden");
    assert_eq!(
        call(Method::POST, "/tags/reload", Some("admin-key"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

/// A fault in the engine mid-request (injected: it panics at its next decoding step) fails
/// the requests it touched with 5xx JSON; `/ready` answers 503 while the engine is down;
/// then the same engine serves again, without a restart of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_fault_fails_its_requests_then_the_engine_comes_back() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    s.predictor().engine.inject_fault();
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"template": "{x}", "inputs": ["the"], "parameters": {"max_new_tokens": 50}}),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::INTERNAL_SERVER_ERROR,
        "backend",
        "internal error (id ",
    );
    // What went wrong is the log's, under that id: the client sees none of it.
    assert!(
        !body["error"].as_str().unwrap().contains("inference thread"),
        "{body}"
    );
    let ready = reqwest::get(format!("{}/ready", s.url)).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["error_type"],
        "engine_down"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(format!("{}/ready", s.url))
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the engine never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let want = by_hand(&s, QED_TPL, Input::Text("CCO".into()));
    assert!((body["predictions"][0]["value"].as_f64().unwrap() - want).abs() < 1e-3);
    let text = metrics(&s.url).await;
    assert!(text.contains("tagllm_engine_restarts_total 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_break_the_batch() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    // Long generations whose clients give up after 50 ms, next to normal predictions.
    let quitter = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut gone = Vec::new();
    for _ in 0..4 {
        let q = quitter.post(format!("{}/predict", s.url)).json(
            &json!({"template": "{x}", "inputs": ["the"], "parameters": {"max_new_tokens": 400}}),
        );
        gone.push(tokio::spawn(q.send()));
    }
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for g in gone {
        assert!(
            g.await.unwrap().is_err(),
            "the impatient client should have timed out"
        );
    }
    let want = by_hand(&s, QED_TPL, Input::Text("CCO".into()));
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!((body["predictions"][0]["value"].as_f64().unwrap() - want).abs() < 1e-3);
    let (_, tags) = get(&s.url, "/tags").await;
    assert_eq!(tags["tags"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_tokenize_metrics_and_openapi() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let (status, info) = get(&s.url, "/info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["model"]["fingerprint"], s.fingerprint());
    let (status, tok) = post(&s.url, "/tokenize", json!({"text": "the <QED> 42"})).await;
    assert_eq!(status, StatusCode::OK);
    let want = s
        .predictor()
        .model
        .tokenizer
        .encode("the <QED> 42")
        .unwrap();
    assert_eq!(tok["ids"], json!(want));
    // The fuzzer's find: `[""]` was read as `{"text": ""}` and answered 200.
    let (status, resp) = post(&s.url, "/tokenize", json!([""])).await;
    assert_error(
        status,
        &resp,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
        "expected a JSON object",
    );
    post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    let text = metrics(&s.url).await;
    for metric in [
        "tagllm_requests_total{route=\"/predict\",status=\"200\"}",
        "tagllm_request_duration_seconds_bucket",
        "tagllm_queue_depth",
        "tagllm_batch_size_count",
        "tagllm_tags_loaded 3",
    ] {
        assert!(text.contains(metric), "metrics lack {metric}:\n{text}");
    }
    let served = reqwest::get(format!("{}/openapi.json", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let checked_in = std::fs::read_to_string(common::root().join("openapi/openapi.json")).unwrap();
    assert_eq!(
        served.trim(),
        checked_in.trim(),
        "openapi/openapi.json drifted from the code: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

/// Admission starts from this machine's pace, measured by the engine before the first
/// request, not from the built-in guess (2,000 units/s): a guess several times too
/// optimistic admitted a first burst that then expired with 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_measures_its_pace_before_the_first_request() {
    let s = start(Options::default()).await;
    let (status, info) = get(&s.url, "/info").await;
    assert_eq!(status, StatusCode::OK, "{info}");
    let pace = info["limits"]["pace_units_per_second"].as_f64().unwrap();
    assert!(pace > 0.0 && pace != 2000.0, "{pace}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_work_beyond_the_queue_budget_at_once() {
    // A 1 ms budget: an empty queue takes any one request, anything more is refused.
    let s = start(Options {
        engine: tagllm::infer::EngineConfig {
            max_queue_wait: Duration::from_millis(1),
            max_first_token_wait: Duration::from_millis(1),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    install_chem(&s).await;
    let generation =
        json!({"template": "{x}", "inputs": ["the cat"], "parameters": {"max_new_tokens": 64}});
    // Alone, it is admitted (an empty queue takes any request), and admission learns the
    // size of such a request; it is served, or expires if not started within 2 ms.
    let (status, body) = post(&s.url, "/predict", generation.clone()).await;
    assert!(
        status == StatusCode::OK || body["error_type"] == "queue_timeout",
        "{status}: {body}"
    );
    let client = reqwest::Client::new();
    let burst: Vec<_> = (0..24)
        .map(|_| {
            let req = client.post(format!("{}/predict", s.url)).json(&generation);
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status(), retry, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let (mut served, mut expired, mut refused) = (0, 0, 0);
    for b in burst {
        let (status, retry, body) = b.await.unwrap();
        match status {
            StatusCode::OK => served += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_error(status, &body, status, "overloaded", "at capacity");
                assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
            }
            // Admitted, then not started within twice the 1 ms budget (a loaded machine).
            StatusCode::SERVICE_UNAVAILABLE if body["error_type"] == "queue_timeout" => {
                expired += 1
            }
            other => panic!("{other}: {body}"),
        }
    }
    // Refusals come before a request is prepared, so the burst is refused while the first
    // one is still in flight; that one may itself expire (its deadline is 2 ms).
    assert!(
        served + expired >= 1 && refused >= 1,
        "served {served}, expired {expired}, refused {refused}"
    );
    // Requests being prepared hold their estimated size in the queue, so every refusal
    // came before tokenising (checked on the smallest size, most came after).
    let text = metrics(&s.url).await;
    let refusals = |stage: &str| {
        let line = format!("tagllm_admission_refusals_total{{stage=\"{stage}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    assert_eq!(refusals("before_preparation"), refused, "{text}");
    assert_eq!(refusals("after_preparation"), 0, "{text}");
    // The budget frees as work finishes: the server takes new work again (served, or
    // expired if not started within 2 ms on a loaded machine; not refused).
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert!(
        status == StatusCode::OK || body["error_type"] == "queue_timeout",
        "{status}: {body}"
    );
    let (_, info) = get(&s.url, "/info").await;
    assert_eq!(info["limits"]["max_queue_wait_ms"], 1);
    assert!(info["limits"]["pace_units_per_second"].as_f64().unwrap() > 0.0);
    // While the queue holds work, too many inputs is still the client's to fix: 422, not
    // 429 (inputs are counted before admission estimates their work).
    let mut streaming = predict_streamed(&s.url, &generation).await;
    assert!(
        streaming.chunk().await.unwrap().is_some(),
        "a generation is in flight"
    );
    let too_many = vec!["CCO"; tagllm::infer::Limits::default().max_batch_inputs + 1];
    assert_invalid_predict(
        &s.url,
        json!({"function": "QED", "inputs": too_many}),
        "inputs per request",
    )
    .await;
    drop(streaming);
}
