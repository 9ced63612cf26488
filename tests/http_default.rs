//! The service on the default model: a PEFT soft prompt dropped into tags/ is served and
//! steers the model exactly as the reference implementation says (softprompt.json).

mod common;

use std::collections::HashMap;

use common::server::{start, wait_for, Options};
use common::{max_abs_diff, npy, reference_json, root};
use serde_json::json;
use tagllm::infer::{compose, Input};
use tagllm::model::Mode;
use tagllm::tags::Template;

fn write_peft(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let t = npy("softprompt_T.npy");
    candle_core::safetensors::save(
        &HashMap::from([("prompt_embeddings".to_string(), t)]),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 10, "token_dim": 576});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_in_peft_soft_prompt_steers_the_model_as_the_reference_says() {
    let model = root().join(tagllm::model::DEFAULT_MODEL_PATH);
    let s = start(Options {
        model: Some(model),
        ..Default::default()
    })
    .await;
    write_peft(&s.tags_dir.join("SoftT"));
    wait_for(&s, |set| set.get("SoftT").is_some()).await;

    let fx = reference_json("softprompt.json");
    let prefix = &fx["cases"][0];
    // Prefix case: [T ; embed(aspirin SMILES)], greedy next token is the reference argmax.
    let r = reqwest::Client::new()
        .post(format!("{}/predict", s.url))
        .json(&json!({"function": "SoftT", "inputs": ["CC(=O)Oc1ccccc1C(=O)O"], "parameters": {"max_new_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["predictions"][0]["ids"][0], prefix["top10"]["ids"][0],
        "{body}"
    );
    assert_eq!(body["tags"]["SoftT"], 1);

    // Both layouts, composed from templates by the server's own code, give the reference
    // hidden states and logits.
    let p = s.predictor();
    let set = p.registry.snapshot();
    for (name, template, input) in [
        ("prefix", "<SoftT>{x}", "CC(=O)Oc1ccccc1C(=O)O"),
        ("middle", "The molecule is <SoftT>{x}", "CCO"),
    ] {
        let c = compose(
            &p.model,
            &set,
            &Template::parse(template),
            &Input::Text(input.into()),
            None,
            1024,
        )
        .unwrap();
        let x = c.embed(&p.model, 0).unwrap().unsqueeze(0).unwrap();
        let h = p
            .model
            .llama
            .forward(&x, None, None, Mode::Fast)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = max_abs_diff(&h, &npy(&format!("softprompt_{name}_hidden.npy")));
        assert!(diff < 1e-3, "{name}: hidden states differ by {diff}");
        let n = h.dim(0).unwrap();
        let logits = p
            .model
            .llama
            .logits(&h.narrow(0, n - 1, 1).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let diff = max_abs_diff(&logits, &npy(&format!("softprompt_{name}_logits_last.npy")));
        assert!(diff < 1e-3, "{name}: logits differ by {diff}");
    }
}
