//! The HTTP service over a real socket, on the tiny model: predictions equal the model run
//! by hand, mixed batches equal single requests, tags hot-reload, and every error answers
//! with the right status and shape. One test binary, a module per group of routes; the
//! helpers they share are here.

#[path = "../common/mod.rs"]
mod common;

mod errors;
mod predict;
mod service;
mod streaming;
mod tags;

use crate::common::server::{install, TagSpec};
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
    let mut row = candle_core::Tensor::cat(&rows, 1).unwrap();
    if let Some((w, b)) = &head.hidden {
        row = row
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
            .tanh()
            .unwrap();
    }
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
        ..
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
