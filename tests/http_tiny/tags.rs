//! Tags on disk as the server sees them: hot add, replace, invalid and removed bundles;
//! PEFT adapters.

use crate::common::server::{bundle, install, start, wait_for, Options, TagSpec};
use candle_core::Tensor;
use reqwest::StatusCode;
use serde_json::json;
use tagllm::infer::{compose, Input};
use tagllm::tags::Template;

use super::*;

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
