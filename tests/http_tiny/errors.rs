//! Answers and errors against the OpenAPI document; context limits; every bad request a
//! clear JSON error, whoever makes it.

use crate::common::openapi::assert_documented;
use crate::common::server::{start, Options};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::*;

/// Real answers checked against the served OpenAPI document: a generation's JSON, every
/// event of its stream (a `done` event's data is the JSON answer, so it is checked as
/// that too), a head's prediction, a validation error, a refused key-less page, and the
/// read-only pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_validate_against_the_openapi_document() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let spec: Value = reqwest::get(format!("{}/openapi.json", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let predict = ("post", "/predict");
    let generation = json!({"template": "<SMILES> {x}", "inputs": ["the cat"], "parameters": {"max_new_tokens": 6}});
    let (status, body) = post(&s.url, "/predict", generation.clone()).await;
    assert_documented(&spec, predict, status, "application/json", &body);

    let resp = predict_streamed(&s.url, &generation).await;
    let status = resp.status();
    let events = sse_events(resp).await;
    assert!(events.len() >= 2, "{events:?}");
    for (name, data) in &events {
        let event = json!({"event": name, "data": data.to_string()});
        assert_documented(&spec, predict, status, "text/event-stream", &event);
    }
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done");
    assert_documented(&spec, predict, status, "application/json", done);

    for body in [
        json!({"function": "QED", "inputs": ["CCO", "c1ccccc1"]}),
        json!({"function": "QED", "inputs": []}),
        json!({"function": "NoSuchTag", "inputs": ["CCO"]}),
    ] {
        let (status, answer) = post(&s.url, "/predict", body).await;
        assert_documented(&spec, predict, status, "application/json", &answer);
    }
    for path in ["/health", "/ready", "/info", "/tags"] {
        let (status, body) = get(&s.url, path).await;
        assert_documented(&spec, ("get", path), status, "application/json", &body);
    }
    let (status, body) = get(&s.url, "/jobs?limit=abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_documented(&spec, ("get", "/jobs"), status, "application/json", &body);
}

/// The configured input limit (1,024 by default) may exceed the model's context (the tiny
/// model's 512): the context is the limit then, and a longer prompt is a 422, not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_are_capped_at_the_models_context() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    // An input between the context (512) and the input limit (1,024) in tokens.
    let mut long = String::new();
    let mut i = 0;
    while post(&s.url, "/tokenize", json!({"text": long})).await.1["ids"]
        .as_array()
        .unwrap()
        .len()
        < 600
    {
        long.push_str(&format!("{i} "));
        i += 1;
    }
    assert_invalid_predict(
        &s.url,
        json!({"function": "QED", "inputs": [long]}),
        "limit is 512",
    )
    .await;
    // Up to the context, a head still answers.
    let (status, resp) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": [&long[..long.len() / 2]]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors() {
    let opts = Options {
        limits: tagllm::infer::Limits {
            max_input_tokens: 80,
            max_generation_tokens: 300,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = start(opts).await;
    install_chem(&s).await;
    let u = &s.url;
    let cases = [
        (
            json!({"function": "Nope", "inputs": ["CCO"]}),
            "unknown tag <Nope>",
        ),
        (
            json!({"template": "<SMILES> {smiles} <Missing>", "inputs": ["CCO"]}),
            "unknown tag <Missing>",
        ),
        (
            json!({"function": "QED", "inputs": [{"wrong": "CCO"}]}),
            "`wrong`",
        ),
        (
            json!({"template": "{a} and {b}", "inputs": [{"a": "x"}]}),
            "missing value for slot {b}",
        ),
        (
            json!({"template": "{a} and {b}", "inputs": ["x"]}),
            "exactly one slot",
        ),
        (
            json!({"function": "QED", "inputs": []}),
            "inputs must not be empty",
        ),
        (
            json!({"function": "QED", "inputs": ["C".repeat(200)]}),
            "limit is 80",
        ),
        (
            json!({"function": "SMILES", "inputs": ["CCO"]}),
            "domain tag",
        ),
        (
            json!({"function": "QED", "template": "x", "inputs": ["CCO"]}),
            "exactly one of",
        ),
        (
            json!({"template": "{x}", "inputs": ["a"], "parameters": {"max_new_tokens": 0}}),
            "max_new_tokens",
        ),
        (
            json!({"template": "{x}", "inputs": ["a"], "parameters": {"top_p": 2.0}}),
            "top_p",
        ),
        (
            json!({"function": "QED", "inputs": ["CCO"], "surprise": 1}),
            "surprise",
        ),
        // Found by the fuzzer: serde reads a struct from an array of its fields in order;
        // the schema (and every client) means an object.
        (
            json!({"template": "{x}", "inputs": ["a"], "parameters": [3]}),
            "expected a JSON object",
        ),
        (
            json!(["QED", null, null, ["CCO"]]),
            "expected a JSON object",
        ),
        // One request's generations are bounded in tokens (the probe's 24 x 1,000-token
        // generation took 2.2 GB); heads are not (they run in bounded batches).
        (
            json!({"template": "{x}", "inputs": vec!["C".repeat(70); 24], "parameters": {"max_new_tokens": 4}}),
            "the limit is 300",
        ),
        // Found by the fuzzer as a 500: a generation may not outgrow the model's context
        // (the tiny model's is 512 positions).
        (
            json!({"template": "{x}", "inputs": ["a"], "parameters": {"max_new_tokens": 512}}),
            "exceeds the model's context of 512 tokens",
        ),
        // Results are keyed by function: a repeat would fold into one result.
        (
            json!({"functions": ["QED", "QED"], "inputs": ["CCO"]}),
            "functions names `QED` twice",
        ),
        // Refused before it is parsed (parsing "<" * 10^6 once froze the server).
        (
            json!({"template": "<".repeat(100_000) + "{x}", "inputs": ["a"]}),
            "limit is 65536",
        ),
    ];
    for (body, mentions) in cases {
        assert_invalid_predict(u, body, mentions).await;
    }
    // Found by an outside probe as 500s: an empty sequence is a 422 (or, where the model
    // has a BOS to run on, a prediction); vanishing temperatures or nuclei decode greedily.
    for body in [
        json!({"template": "", "inputs": [{}]}),
        json!({"template": "{x}", "inputs": [""]}),
    ] {
        let (status, resp) = post(u, "/predict", body.clone()).await;
        if status != StatusCode::OK {
            assert_error(
                status,
                &resp,
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "empty sequence",
            );
        }
    }
    let greedy = post(
        u,
        "/predict",
        json!({"template": "{x}", "inputs": ["a"], "parameters": {"max_new_tokens": 3}}),
    )
    .await;
    assert_eq!(greedy.0, StatusCode::OK, "{}", greedy.1);
    for parameters in [
        json!({"max_new_tokens": 3, "temperature": 1e-300}),
        json!({"max_new_tokens": 3, "temperature": 1.0, "top_p": 1e-300}),
    ] {
        let (status, resp) = post(
            u,
            "/predict",
            json!({"template": "{x}", "inputs": ["a"], "parameters": parameters}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{parameters}: {resp}");
        assert_eq!(
            resp["predictions"], greedy.1["predictions"],
            "{parameters}: the greedy limit"
        );
    }

    // Found by an outside probe: a 1 MB input was tokenised (~500 ms) before it was
    // refused; its length in bytes alone tells that it cannot fit.
    assert_invalid_predict(
        u,
        json!({"template": "{x}", "inputs": ["C".repeat(900_000)]}),
        "bytes of text cannot fit",
    )
    .await;
    // Found by an outside probe as a 500 carrying a backtrace: a temperature past f32's
    // range. Huge temperatures sample in the uniform limit, as 1e3 does, with any nucleus.
    for top_p in [None, Some(0.9)] {
        let sample = |temperature: f64| {
            let mut parameters =
                json!({"max_new_tokens": 4, "temperature": temperature, "seed": 7});
            if let Some(p) = top_p {
                parameters["top_p"] = json!(p);
            }
            post(
                u,
                "/predict",
                json!({"template": "{x}", "inputs": ["a"], "parameters": parameters}),
            )
        };
        let limit = sample(1e3).await;
        assert_eq!(limit.0, StatusCode::OK, "{}", limit.1);
        for temperature in [1e30, 3.4e38, 1e308, f64::MAX] {
            let (status, resp) = sample(temperature).await;
            assert_eq!(status, StatusCode::OK, "{temperature} {top_p:?}: {resp}");
            assert_eq!(
                resp["predictions"], limit.1["predictions"],
                "{temperature} {top_p:?}: the uniform limit"
            );
        }
    }

    // Input values are never parsed for tags: a tag name inside an input is just text.
    let (status, body) = post(
        u,
        "/predict",
        json!({"function": "QED", "inputs": ["<Nope> CCO <QED>"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let r = reqwest::Client::new()
        .post(format!("{u}/predict"))
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_type"],
        "bad_request"
    );
    // One byte over the 1 MiB limit: the server has read the whole body when it refuses
    // it, so the client never writes into a connection closed under it (a body twice the
    // limit sometimes lost the 413 to a broken pipe).
    let wrapper = json!({"function": "QED", "inputs": [""]}).to_string().len();
    let big = json!({"function": "QED", "inputs": ["C".repeat((1 << 20) + 1 - wrapper)]});
    assert_eq!(big.to_string().len(), (1 << 20) + 1);
    let (status, resp) = post(u, "/predict", big).await;
    assert_error(
        status,
        &resp,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "size limit",
    );
    let (status, resp) = get(u, "/tags/Nope").await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "not_found", "Nope");
    let (status, resp) = get(u, "/no/such/route").await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "not_found", "route");

    // Overloaded: with every permit taken, a prediction gets 429.
    let permits = s.state.permits.clone();
    let held = permits.acquire_many(64).await.unwrap();
    let (status, resp) = post(u, "/predict", json!({"function": "QED", "inputs": ["CCO"]})).await;
    assert_error(
        status,
        &resp,
        StatusCode::TOO_MANY_REQUESTS,
        "overloaded",
        "too many",
    );
    drop(held);
    let (status, _) = post(u, "/predict", json!({"function": "QED", "inputs": ["CCO"]})).await;
    assert_eq!(status, StatusCode::OK);
}

/// Found by an outside probe: a 405 answered an empty body and a bad path segment plain
/// text. Every error, whoever makes it, is `{error, error_type}` JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_even_axums_own() {
    let s = start(Options::default()).await;
    let c = reqwest::Client::new();
    let cases = [
        (
            reqwest::Method::DELETE,
            "/predict",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            "/tags/%ff",
            None,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            reqwest::Method::GET,
            "/no/such/route",
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            reqwest::Method::POST,
            "/predict",
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
        ),
    ];
    for (method, path, content_type, status, kind) in cases {
        let mut r = c.request(method.clone(), format!("{}{path}", s.url));
        if let Some(t) = content_type {
            r = r.header("content-type", t).body("{}");
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                r.headers().contains_key("allow"),
                "{method} {path}: Allow kept"
            );
        }
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error_type"], kind, "{method} {path}: {body}");
        assert!(!body["error"].as_str().unwrap().is_empty(), "{body}");
    }
}
