//! Predictions over HTTP equal the model run by hand: regression, mixed batches, several
//! functions over one prefix, multi-position heads, classification and generation.

use crate::common::server::{install, start, Options, TagSpec};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tagllm::infer::{compose, Input};
use tagllm::tags::{HeadSpec, Template};

use super::*;

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

    // The same prompt again starts from the keys and values kept of the first (the prefix
    // cache, on by default) and answers exactly the same.
    let (status, body) = post(&s.url, "/predict", json!({"template": "<Lang> {x} then", "inputs": ["the cat"], "parameters": {"max_new_tokens": 5}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["predictions"][0]["ids"], json!(want.ids));
    let text = metrics(&s.url).await;
    let reused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tagllm_prefix_reused_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no prefix reuse metric:\n{text}"));
    assert!(reused > 0.0, "{reused} prompt positions reused");
}

/// A regression head with a range never answers outside it: the same head and tag without
/// the range answer values on both sides of it, and with it each is the unbounded answer
/// clamped into the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_head_never_answers_outside_its_range() {
    let s = start(Options::default()).await;
    install(&s, &TagSpec::domain("SMILES")).await;
    let free = TagSpec::regression("Free", "The molecule <SMILES> {smiles} scores <Free>");
    install(&s, &free).await;
    let inputs: Vec<String> = [
        "CCO", "c1ccccc1", "CC(=O)O", "N#N", "CCCCCCCC", "O", "ClCCl", "C1CC1",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let values = |body: &Value| -> Vec<f64> {
        body["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_f64().unwrap())
            .collect()
    };
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "Free", "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let unbounded = values(&body);
    let mut sorted = unbounded.clone();
    sorted.sort_by(f64::total_cmp);
    // A range that the unbounded answers cross on both sides.
    let (lo, hi) = (sorted[2], sorted[sorted.len() - 3]);
    assert!(lo < hi, "the answers do not spread: {unbounded:?}");
    let bounded = TagSpec {
        name: "Bounded",
        template: Some("The molecule <SMILES> {smiles} scores <Bounded>"),
        head: Some(HeadSpec::Regression {
            target_mean: 10.0,
            target_std: 2.0,
            range: Some([lo, hi]),
        }),
        ..free
    };
    install(&s, &bounded).await;
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"function": "Bounded", "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = values(&body);
    for (g, u) in got.iter().zip(&unbounded) {
        assert!((lo..=hi).contains(g), "{g} outside [{lo}, {hi}]");
        assert!((g - u.clamp(lo, hi)).abs() < 1e-9, "{g} is not {u} clamped");
    }
    assert!(got.contains(&lo) && got.contains(&hi));
    // The range is part of the tag as /tags shows it.
    let (_, tag) = get(&s.url, "/tags/Bounded").await;
    assert_eq!(tag["manifest"]["head"]["range"], json!([lo, hi]), "{tag}");
}

/// An MLP head (a tanh hidden layer, over several positions) is served as computed by hand,
/// alone and batched with a linear head's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlp_head_is_served_as_computed_by_hand() {
    let s = start(Options::default()).await;
    install_chem(&s).await;
    let tpl = "The molecule <SMILES> {smiles} has depth <Depth>";
    let spec = TagSpec {
        head_hidden: 6,
        head_positions: 2,
        seed: 4.0,
        ..TagSpec::regression("Depth", tpl)
    };
    install(&s, &spec).await;
    let inputs = ["CCO", "c1ccccc1", "CC(=O)O"];
    let (status, body) = post(
        &s.url,
        "/predict",
        json!({"functions": ["Depth", "QED"], "inputs": inputs}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut values = Vec::new();
    for (i, smiles) in inputs.iter().enumerate() {
        for (function, template) in [("Depth", tpl), ("QED", QED_TPL)] {
            let want = by_hand(&s, template, Input::Text(smiles.to_string()));
            let got = body["predictions"][i][function]["value"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-3,
                "{function} of {smiles}: served {got}, by hand {want}"
            );
            if function == "Depth" {
                values.push(got);
            }
        }
    }
    assert!(
        values.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-6),
        "constant: {values:?}"
    );
    let (_, tag) = get(&s.url, "/tags/Depth").await;
    assert_eq!(tag["manifest"]["head_hidden"], 6, "{tag}");
}
