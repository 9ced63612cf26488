//! The OpenAI-compatible routes on the tiny model over real HTTP: what they answer equals
//! `/predict` for the same prompt, streams join to the whole answer, errors come in
//! OpenAI's shape, and every answer is the one the OpenAPI document describes.

mod common;

use common::openapi::{assert_component, assert_documented};
use common::server::{install, start, Options, TagSpec};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tagllm::tags::TagKind;

/// A generation tag in the shape of the shipped `<Translate>`: two domain tags in a chat
/// turn.
const SAY_TPL: &str =
    "<|im_start|>user\n<Say><EN> to<FR>: {text}<|im_end|>\n<|im_start|>assistant\n";

async fn serve(opts: Options) -> common::server::TestServer {
    let s = start(opts).await;
    for lang in ["EN", "FR", "IT"] {
        install(
            &s,
            &TagSpec {
                seed: lang.len() as f64 + lang.as_bytes()[0] as f64 / 10.0,
                ..TagSpec::domain(lang)
            },
        )
        .await;
    }
    install(&s, &TagSpec::domain("SMILES")).await;
    install(
        &s,
        &TagSpec::regression(
            "QED",
            "The molecule <SMILES> {smiles} has druglikeness <QED>",
        ),
    )
    .await;
    install(
        &s,
        &TagSpec {
            name: "Say",
            kind: TagKind::Function,
            version: 1,
            num_vectors: 2,
            head: None,
            head_positions: 1,
            head_hidden: 0,
            template: Some(SAY_TPL),
            seed: 5.0,
        },
    )
    .await;
    s
}

async fn send(url: &str, path: &str, body: Value, key: Option<&str>) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

async fn post(url: &str, path: &str, body: Value) -> (StatusCode, Value) {
    send(url, path, body, None).await
}

async fn spec(url: &str) -> Value {
    reqwest::get(format!("{url}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The `data:` payloads of a stream, `[DONE]` as a string.
async fn streamed(url: &str, path: &str, mut body: Value) -> (StatusCode, Vec<Value>) {
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let data = text
        .split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|v| v.strip_prefix(' ').unwrap_or(v))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d)))
        .collect();
    (status, data)
}

/// `/predict`'s text and its usage for one input.
async fn predicted(url: &str, body: Value) -> (String, String, Value) {
    let (status, resp) = post(url, "/predict", body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let p = &resp["predictions"][0];
    let reason = match p["finish_reason"].as_str().unwrap() {
        "length" => "length",
        _ => "stop",
    };
    (
        p["text"].as_str().unwrap().to_string(),
        reason.to_string(),
        resp["usage"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_the_base_model_and_the_tags_that_generate() {
    let s = serve(Options::default()).await;
    let resp = reqwest::get(format!("{}/v1/models", s.url)).await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_documented(
        &spec(&s.url).await,
        ("get", "/v1/models"),
        status,
        "application/json",
        &body,
    );
    let base = tagllm::model::catalogue::short_name(&s.model_path);
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // QED has a head and the languages are domain tags: neither generates.
    assert_eq!(ids, [base.as_str(), "Say"], "{body}");
    assert_eq!(body["data"][0]["parent"], Value::Null);
    assert_eq!(body["data"][1]["parent"], base.as_str());
    assert_eq!(body["data"][1]["root"], base.as_str());
}

/// Completions and chat answer what `/predict` answers for the same prompt: with a tag
/// (its template, its languages replaced), with the base model (the text as it is, or the
/// chat template around the messages); streamed, the pieces join to the same text; `n`
/// samples choice i with seed i.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_predict_and_streams_join_to_them() {
    let s = serve(Options::default()).await;
    let url = &s.url;
    let doc = spec(url).await;
    let base = tagllm::model::catalogue::short_name(&s.model_path);
    let it_fr = SAY_TPL.replace("<EN>", "<IT>");
    let chat_tpl = "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n";
    let cases = [
        (
            "/v1/completions",
            json!({"model": "Say", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0}),
            json!({"function": "Say", "inputs": ["the cat sat"], "parameters": {"max_new_tokens": 8}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "Say", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}],
                   "max_tokens": 8, "temperature": 0, "tags": {"source": "IT", "target": "FR"}}),
            json!({"template": it_fr, "inputs": ["the cat sat"], "parameters": {"max_new_tokens": 8}}),
        ),
        (
            "/v1/completions",
            json!({"model": base, "prompt": "CCO and c1ccccc1", "max_tokens": 6, "temperature": 0}),
            json!({"template": "{x}", "inputs": ["CCO and c1ccccc1"], "parameters": {"max_new_tokens": 6}}),
        ),
        (
            // A content holding a chat token is text, as a slot value is.
            "/v1/chat/completions",
            json!({"model": base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi <|im_end|> there"}]}],
                   "max_tokens": 6, "temperature": 0}),
            json!({"template": chat_tpl, "inputs": ["hi <|im_end|> there"], "parameters": {"max_new_tokens": 6}}),
        ),
    ];
    for (path, body, same) in cases {
        let chat = path.contains("chat");
        let (status, whole) = post(url, path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {whole}");
        assert_documented(&doc, ("post", path), status, "application/json", &whole);
        let choice = &whole["choices"][0];
        let text = if chat {
            &choice["message"]["content"]
        } else {
            &choice["text"]
        };
        let (want, reason, usage) = predicted(url, same).await;
        assert_eq!(text, want.as_str(), "{path} {body}");
        assert_eq!(choice["finish_reason"], reason.as_str(), "{whole}");
        assert_eq!(
            whole["usage"]["prompt_tokens"], usage["prompt_tokens"],
            "{whole}"
        );
        assert_eq!(
            whole["usage"]["completion_tokens"], usage["completion_tokens"],
            "{whole}"
        );

        let mut asked = body.clone();
        asked["stream_options"] = json!({"include_usage": true});
        let (status, events) = streamed(url, path, asked).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(events.last(), Some(&json!("[DONE]")), "{events:?}");
        let chunks = &events[..events.len() - 1];
        let mut joined = String::new();
        let chunk_schema = if chat {
            "ChatCompletionChunk"
        } else {
            "Completion"
        };
        for c in chunks {
            let event = json!({"data": c.to_string()});
            assert_documented(&doc, ("post", path), status, "text/event-stream", &event);
            assert_component(&doc, chunk_schema, c);
            let piece = if chat {
                &c["choices"][0]["delta"]["content"]
            } else {
                &c["choices"][0]["text"]
            };
            joined.push_str(piece.as_str().unwrap_or(""));
        }
        assert_eq!(joined, want, "{path}: {events:?}");
        let last_choice = &chunks[chunks.len() - 2]["choices"][0];
        assert_eq!(last_choice["finish_reason"], reason.as_str(), "{events:?}");
        let usage_chunk = &chunks[chunks.len() - 1];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"], whole["usage"], "{events:?}");
        if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        }
    }

    // n = 3: choice i is sampled with seed 7 + i.
    let body = json!({"model": "Say", "prompt": "the dog", "max_tokens": 6, "temperature": 1.5, "seed": 7, "n": 3});
    let (status, whole) = post(url, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let (want, _, _) = predicted(
            url,
            json!({"function": "Say", "inputs": ["the dog"],
            "parameters": {"max_new_tokens": 6, "temperature": 1.5, "seed": 7 + i}}),
        )
        .await;
        assert_eq!(c["text"], want.as_str(), "choice {i}: {whole}");
    }
    let (_, events) = streamed(url, "/v1/completions", body).await;
    for (i, c) in choices.iter().enumerate() {
        let joined: String = events
            .iter()
            .filter(|e| e["choices"][0]["index"] == i)
            .filter_map(|e| e["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(
            c["text"],
            joined.as_str(),
            "streamed choice {i}: {events:?}"
        );
    }

    // Each answered request is counted under its tag; the base model's under "(none)".
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"tagllm_tag_requests_total{outcome="ok",tag="Say"}"#,
        r#"tagllm_tag_requests_total{outcome="ok",tag="(none)"}"#,
        r#"tagllm_tag_tokens_total{kind="completion",tag="Say"}"#,
        r#"tagllm_tag_request_duration_seconds_count{tag="Say"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_in_openais_shape_naming_the_field() {
    let mut opts = Options::default();
    opts.config.api_key = Some("reader".into());
    opts.config.admin_api_key = Some("admin".into());
    let s = serve(opts).await;
    let url = &s.url;
    let doc = spec(url).await;
    let key = Some("reader");
    let base = tagllm::model::catalogue::short_name(&s.model_path);
    let completion = ("post", "/v1/completions");
    let chat = ("post", "/v1/chat/completions");
    let cases = [
        (
            completion,
            json!({"model": "Nope", "prompt": "x"}),
            404,
            Some("model"),
            "model_not_found",
        ),
        (
            completion,
            json!({"model": "QED", "prompt": "x"}),
            400,
            Some("model"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "logprobs": 2}),
            400,
            Some("logprobs"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "best_of": 3}),
            400,
            Some("best_of"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "frobnicate": 1}),
            400,
            Some("frobnicate"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": 5}),
            400,
            Some("prompt"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "n": 99}),
            400,
            Some("n"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "max_tokens": 0}),
            400,
            Some("max_tokens"),
            "validation",
        ),
        (
            completion,
            json!({"model": "Say", "prompt": "x", "tags": {"target": "XX"}}),
            400,
            Some("tags"),
            "validation",
        ),
        (
            completion,
            json!({"model": base, "prompt": "x", "tags": {"EN": "IT"}}),
            400,
            Some("tags"),
            "validation",
        ),
        (
            chat,
            json!({"model": "Say", "messages": []}),
            400,
            Some("messages"),
            "validation",
        ),
        (
            chat,
            json!({"model": "Say", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            Some("messages"),
            "validation",
        ),
        (
            chat,
            json!({"model": "Say", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            Some("messages"),
            "validation",
        ),
    ];
    for (route, body, want, param, code) in cases {
        let (status, answer) = send(url, route.1, body.clone(), key).await;
        assert_eq!(status.as_u16(), want, "{body}: {answer}");
        assert_documented(&doc, route, status, "application/json", &answer);
        assert_eq!(answer["error"]["param"], json!(param), "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // The layers' own errors too: a missing key, malformed JSON.
    let (status, answer) = send(
        url,
        "/v1/completions",
        json!({"model": "Say", "prompt": "x"}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["error"]["type"], "authentication_error", "{answer}");
    assert_documented(&doc, completion, status, "application/json", &answer);
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("reader")
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    // The reading key suffices (the routes only read), and /predict keeps its own shape.
    let (status, answer) = send(
        url,
        "/v1/completions",
        json!({"model": "Say", "prompt": "x", "max_tokens": 2}),
        key,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = send(
        url,
        "/predict",
        json!({"function": "Nope", "inputs": ["x"]}),
        key,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["error_type"], "validation", "{answer}");
    // A made-up model never becomes a metrics label.
    let metrics = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth("reader")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("Nope"), "{metrics}");
    assert!(
        metrics.contains(r#"tagllm_tag_requests_total{outcome="invalid",tag="(unknown)"}"#),
        "{metrics}"
    );
}
