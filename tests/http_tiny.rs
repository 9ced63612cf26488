//! The HTTP service over a real socket, on the tiny model: predictions equal the model run
//! by hand, mixed batches equal single requests, tags hot-reload, and every error answers
//! with the right status and shape.

mod common;

use std::time::Duration;

use candle_core::Tensor;
use common::openapi::assert_documented;
use common::server::{bundle, install, start, wait_for, Options, TagSpec};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tagllm::infer::{compose, Input};
use tagllm::model::{rows_at, Mode};
use tagllm::tags::{HeadSpec, Template};

const QED_TPL: &str = "The molecule <SMILES> {smiles} has druglikeness <QED>";
const LOGP_TPL: &str = "The molecule <SMILES> {smiles} has logP <LogP>";

async fn post(url: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("{url}{path}")).await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The Prometheus text exposition at `/metrics`.
async fn metrics(url: &str) -> String {
    let r = reqwest::get(format!("{url}/metrics")).await.unwrap();
    r.text().await.unwrap()
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str, mentions: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error_type"], kind, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(mentions),
        "{body} should mention {mentions:?}"
    );
}

/// `POST /predict` of `body` must answer 422 `validation`, its error mentioning `mentions`.
async fn assert_invalid_predict(url: &str, body: Value, mentions: &str) {
    let (status, resp) = post(url, "/predict", body).await;
    assert_error(
        status,
        &resp,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
        mentions,
    );
}

/// What the model computes for one input, by hand: compose, one forward, the head.
fn by_hand(server: &common::server::TestServer, template: &str, input: Input) -> f64 {
    let p = server.predictor();
    let set = p.registry.snapshot();
    let c = compose(
        &p.model,
        &set,
        &Template::parse(template),
        &input,
        None,
        1024,
    )
    .unwrap();
    let x = c.embed(&p.model, 0).unwrap().unsqueeze(0).unwrap();
    let h = p
        .model
        .llama
        .forward(&x, None, None, Mode::Differentiable)
        .unwrap();
    let (b, pos) = c.head.clone().unwrap();
    let head = b.head.as_ref().unwrap();
    // The head's input: its tag's last `positions` hidden states, side by side.
    let rows: Vec<_> = (pos + 1 - head.positions..=pos)
        .map(|p| rows_at(&h, &[p]).unwrap())
        .collect();
    let row = candle_core::Tensor::cat(&rows, 1).unwrap();
    let out: Vec<f32> = row
        .matmul(&head.weight.t().unwrap())
        .unwrap()
        .broadcast_add(&head.bias)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let HeadSpec::Regression {
        target_mean,
        target_std,
    } = head.spec
    else {
        panic!()
    };
    out[0] as f64 * target_std + target_mean
}

async fn install_chem(server: &common::server::TestServer) {
    install(server, &TagSpec::domain("SMILES")).await;
    install(server, &TagSpec::regression("QED", QED_TPL)).await;
    install(
        server,
        &TagSpec {
            seed: 3.0,
            ..TagSpec::regression("LogP", LOGP_TPL)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_predictions_equal_the_model_run_by_hand() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO", {"smiles": "c1ccccc1"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], json!({"QED": 1, "SMILES": 1}));
    for (i, smiles) in ["CCO", "c1ccccc1"].iter().enumerate() {
        let want = by_hand(&s, QED_TPL, Input::Text(smiles.to_string()));
        let got = body["predictions"][i]["value"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-3,
            "{smiles}: served {got}, by hand {want}"
        );
    }
    // A free template composing the same tags reads the same head.
    let (_, free) = post(
        &s.url,
        "/predict",
        json!({"template": QED_TPL, "inputs": [{"smiles": "CCO"}]}),
    )
    .await;
    assert!(
        (free["predictions"][0]["value"].as_f64().unwrap()
            - body["predictions"][0]["value"].as_f64().unwrap())
        .abs()
            < 1e-4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_tag_batches_equal_single_requests() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let reqs: Vec<Value> = (0..12)
        .map(|i| {
            let f = if i % 2 == 0 { "QED" } else { "LogP" };
            json!({"function": f, "inputs": ["C".repeat(i + 1)]})
        })
        .collect();
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(
            post(&s.url, "/predict", r.clone()).await.1["predictions"][0]["value"]
                .as_f64()
                .unwrap(),
        );
    }
    let url = s.url.clone();
    let together = futures_join(reqs.iter().map(|r| {
        let (url, r) = (url.clone(), r.clone());
        async move { post(&url, "/predict", r).await }
    }))
    .await;
    for (i, (status, body)) in together.iter().enumerate() {
        assert_eq!(*status, StatusCode::OK);
        let v = body["predictions"][0]["value"].as_f64().unwrap();
        assert!(
            (v - alone[i]).abs() < 1e-3,
            "request {i}: batched {v}, alone {}",
            alone[i]
        );
    }
}

async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_functions_share_the_prefix_and_match_separate_calls() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let inputs = json!(["CCO", "CC(=O)O"]);
    let (status, both) = post(
        &s.url,
        "/predict",
        json!({"functions": ["QED", "LogP"], "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{both}");
    for f in ["QED", "LogP"] {
        let (_, one) = post(&s.url, "/predict", json!({"function": f, "inputs": inputs})).await;
        for i in 0..2 {
            let a = both["predictions"][i][f]["value"].as_f64().unwrap();
            let b = one["predictions"][i]["value"].as_f64().unwrap();
            assert!(
                (a - b).abs() < 1e-3,
                "{f} input {i}: shared prefix {a}, separate {b}"
            );
        }
    }
}

/// A head that reads several of its tag's positions reads them in order, alone, beside
/// another function on a shared prefix, and in a padded batch of different lengths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_several_positions_reads_its_tags_last_rows() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    const WIDE_TPL: &str = "The molecule <SMILES> {smiles} is <Wide>";
    install(
        &s,
        &TagSpec {
            head_positions: 3,
            seed: 5.0,
            ..TagSpec::regression("Wide", WIDE_TPL)
        },
    )
    .await;
    let inputs = ["CCO", "c1ccccc1C(=O)O"];
    let (status, alone) = post(
        &s.url,
        "/predict",
        json!({"function": "Wide", "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{alone}");
    let (status, both) = post(
        &s.url,
        "/predict",
        json!({"functions": ["QED", "Wide"], "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{both}");
    for (i, smiles) in inputs.iter().enumerate() {
        let want = by_hand(&s, WIDE_TPL, Input::Text(smiles.to_string()));
        for got in [&alone["predictions"][i], &both["predictions"][i]["Wide"]] {
            let got = got["value"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-3,
                "{smiles}: served {got}, by hand {want}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_and_generation() {
    let s = start(Options::default()).await;
    let labels = vec!["low".to_string(), "mid".to_string(), "high".to_string()];
    let spec = TagSpec {
        head: Some(HeadSpec::Classification {
            labels: labels.clone(),
        }),
        ..TagSpec::regression("Tox", "Is <Tox> {x}")
    };
    install(&s, &spec).await;
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "Tox", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let p = &body["predictions"][0];
    let scores = p["scores"].as_object().unwrap();
    let total: f64 = scores.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    let best = scores
        .iter()
        .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
        .unwrap()
        .0;
    assert_eq!(p["label"].as_str().unwrap(), best);

    // No head: generation, greedy by default, equal to the model's own generate.
    install(&s, &TagSpec::domain("Lang")).await;
    let (status, body) = post(&s.url, "/predict", json!({"template": "<Lang> {x} then", "inputs": ["the cat"], "parameters": {"max_new_tokens": 5}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let p = s.predictor();
    let c = compose(
        &p.model,
        &p.registry.snapshot(),
        &Template::parse("<Lang> {x} then"),
        &Input::Text("the cat".into()),
        None,
        1024,
    )
    .unwrap();
    let params = tagllm::model::GenerationParams {
        max_new_tokens: 5,
        ..Default::default()
    };
    let want = tagllm::model::generate(&p.model, &c.embed(&p.model, 0).unwrap(), &params).unwrap();
    assert_eq!(body["predictions"][0]["ids"], json!(want.ids));
    assert_eq!(body["predictions"][0]["text"], json!(want.text));

    // A stop sequence cuts the text before it and ends decoding.
    let last = want.text.chars().last().expect("some text").to_string();
    let cut = want.text.find(&last).unwrap();
    let (status, body) = post(&s.url, "/predict", json!({"template": "<Lang> {x} then", "inputs": ["the cat"], "parameters": {"max_new_tokens": 5, "stop": [last]}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["text"], json!(want.text[..cut]));
    assert_eq!(body["predictions"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_add_replace_invalid_and_remove() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let (_, v1) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    // Replace with version 2 (other vectors): served without restart, response names it.
    install(
        &s,
        &TagSpec {
            version: 2,
            seed: 7.0,
            ..TagSpec::regression("QED", QED_TPL)
        },
    )
    .await;
    let (_, v2) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(v2["tags"]["QED"], 2);
    assert_ne!(v1["predictions"][0]["value"], v2["predictions"][0]["value"]);

    // An invalid replacement (NaN vectors) is reported and version 2 keeps serving.
    let d = s.predictor().model.config().hidden_size;
    let mut bad = bundle(
        &TagSpec {
            version: 3,
            ..TagSpec::regression("QED", QED_TPL)
        },
        &s.fingerprint(),
        d,
    );
    bad.vectors = (bad.vectors.clone() * f64::NAN).unwrap();
    bad.save(&s.tags_dir).unwrap();
    // The watcher may first catch the files mid-rewrite (a checksum error): wait for the
    // verdict on the finished bundle.
    wait_for(&s, |set| {
        set.errors.get("QED").is_some_and(|e| e.contains("NaN"))
    })
    .await;
    let (_, tags) = get(&s.url, "/tags").await;
    assert!(
        tags["errors"]["QED"].as_str().unwrap().contains("NaN"),
        "{tags}"
    );
    let (_, still) = post(
        &s.url,
        "/predict",
        json!({"function": "QED", "inputs": ["CCO"]}),
    )
    .await;
    assert_eq!(still["tags"]["QED"], 2);
    assert_eq!(still["predictions"], v2["predictions"]);

    // A tag for other base weights, and a bundle with broken JSON, are refused too.
    let other = bundle(&TagSpec::domain("Other"), "0".repeat(64).as_str(), d);
    other.save(&s.tags_dir).unwrap();
    std::fs::create_dir_all(s.tags_dir.join("Broken")).unwrap();
    std::fs::write(s.tags_dir.join("Broken/manifest.json"), b"{ not json").unwrap();
    wait_for(&s, |set| {
        set.errors.contains_key("Other") && set.errors.contains_key("Broken")
    })
    .await;
    let set = s.predictor().registry.snapshot();
    assert!(
        set.errors["Other"].contains("other base weights"),
        "{}",
        set.errors["Other"]
    );
    assert!(set.get("Other").is_none() && set.get("Broken").is_none());

    // Removal.
    std::fs::remove_dir_all(s.tags_dir.join("LogP")).unwrap();
    wait_for(&s, |set| set.get("LogP").is_none()).await;
    assert_invalid_predict(
        &s.url,
        json!({"function": "LogP", "inputs": ["CCO"]}),
        "unknown tag <LogP>",
    )
    .await;

    // GET /tags/{name} gives the manifest.
    let (status, qed) = get(&s.url, "/tags/QED").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(qed["manifest"]["version"], 2);
    assert_eq!(qed["manifest"]["head"]["type"], "regression");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peft_prompt_tuning_directory_is_served_and_exported_back() {
    let s = start(Options::default()).await;
    let d = s.predictor().model.config().hidden_size;
    let b = bundle(
        &TagSpec {
            num_vectors: 5,
            ..TagSpec::domain("x")
        },
        &s.fingerprint(),
        d,
    );
    b.export_peft(&s.tags_dir.join("Soft"), "tiny").unwrap();
    wait_for(&s, |set| set.get("Soft").is_some()).await;
    let served = s
        .predictor()
        .registry
        .snapshot()
        .get("Soft")
        .unwrap()
        .clone();
    assert_eq!(served.source, "peft");
    assert_eq!(
        served.vectors.to_vec2::<f32>().unwrap(),
        b.vectors.to_vec2::<f32>().unwrap()
    );
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "Soft", "inputs": ["the cat"], "parameters": {"max_new_tokens": 3}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Its default template splices the soft prompt right before the input.
    let p = s.predictor();
    let set = p.registry.snapshot();
    let c = compose(
        &p.model,
        &set,
        &Template::parse("<Soft>{x}"),
        &Input::Text("the cat".into()),
        None,
        1024,
    )
    .unwrap();
    let want = Tensor::cat(&[&b.vectors, &p.model.embed_text("the cat").unwrap()], 0).unwrap();
    let got = c.embed(&p.model, 0).unwrap();
    assert_eq!(
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap()
    );
}

/// The events of a server-sent event stream, read to its end: (event name, data as JSON).
async fn sse_events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .filter_map(|l| l.strip_prefix(name))
                    .map(|v| v.strip_prefix(' ').unwrap_or(v))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let data = field("data:");
            // Keep-alive comments carry no data.
            (!data.is_empty()).then(|| (field("event:"), serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

/// `POST /predict` of `body` with `stream: true`.
async fn predict_streamed(url: &str, body: &Value) -> reqwest::Response {
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    reqwest::Client::new()
        .post(format!("{url}/predict"))
        .json(&streamed)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_streams_its_text_as_server_sent_events() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    for (name, parameters) in [
        ("greedy", json!({"max_new_tokens": 24})),
        // Pieces never run past a stop string that cuts the text later: the tiny model
        // says "onon..onxx..", so "n" must be held back until "x" shows it is a stop.
        ("stop", json!({"max_new_tokens": 24, "stop": ["nx"]})),
    ] {
        let body = json!({"template": "<SMILES> {x}", "inputs": ["the cat sat on"], "parameters": parameters});
        let (status, whole) = post(&s.url, "/predict", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        let finish = if name == "stop" { "stop" } else { "length" };
        assert_eq!(whole["predictions"][0]["finish_reason"], finish, "{whole}");
        let resp = predict_streamed(&s.url, &body).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let events = sse_events(resp).await;
        let (last, tokens) = events.split_last().unwrap();
        assert_eq!(last.0, "done", "{name}: {events:?}");
        assert_eq!(
            last.1, whole,
            "{name}: the done event is the unstreamed answer"
        );
        assert!(
            tokens.iter().all(|(e, _)| e == "token"),
            "{name}: {events:?}"
        );
        let text: String = tokens
            .iter()
            .map(|(_, d)| d["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            text, whole["predictions"][0]["text"],
            "{name}: the pieces add up to the text"
        );
        assert!(tokens.len() >= 2 || name == "stop", "{name}: {events:?}");
    }
    // Only a single generation streams; the rest is refused before any event.
    for (body, mentions) in [
        (
            json!({"function": "QED", "inputs": ["CCO"], "stream": true}),
            "no head",
        ),
        (
            json!({"template": "{x}", "inputs": ["a", "b"], "stream": true}),
            "one input",
        ),
    ] {
        assert_invalid_predict(&s.url, body, mentions).await;
    }
}

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
