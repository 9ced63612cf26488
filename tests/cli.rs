//! The `tagllm` binary, run as a user runs it.

mod common;

use std::process::Command;

use common::{reference_json, root, tempdir};

fn tagllm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .args(args)
        .current_dir(root())
        .env_remove("TAGLLM_MODEL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn tokenize_prints_reference_ids() {
    let fixture = reference_json("tokens.json");
    for case in fixture["cases"].as_array().unwrap().iter().step_by(9) {
        let (ok, out, err) = tagllm(&["tokenize", case["text"].as_str().unwrap()]);
        assert!(ok, "{err}");
        assert_eq!(json(&out)["ids"], case["ids"]);
    }
}

#[test]
fn generate_with_chat_template_matches_reference_and_raw_continues_text() {
    let fx = reference_json("generation.json");
    let (ok, out, err) = tagllm(&[
        "generate",
        "--json",
        "--max-new-tokens",
        "24",
        "What is the capital of France?",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["ids"], fx["greedy_new_ids"]);
    assert_eq!(v["text"], fx["greedy_text"]);

    let (ok, out, err) = tagllm(&[
        "generate",
        "--raw",
        "--json",
        "--max-new-tokens",
        "3",
        "The capital of France is",
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["ids"][0], 7042, "{v}"); // " Paris", the reference argmax
    assert_eq!(v["ids"].as_array().unwrap().len(), 3);
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"));
}

#[test]
fn info_describes_the_default_model() {
    let (ok, out, err) = tagllm(&["info"]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["config"]["num_layers"], 30);
    assert_eq!(v["config"]["hidden_size"], 576);
    assert_eq!(v["config"]["vocab_size"], 49152);
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(v["fingerprint"].as_str().unwrap().len(), 64);
}

#[test]
fn tiny_model_command_writes_a_loadable_model() {
    let dir = tempdir();
    let path = dir.path().join("tiny.gguf");
    let p = path.to_str().unwrap();
    let (ok, _, err) = tagllm(&["tiny-model", "--out", p, "--seed", "4"]);
    assert!(ok, "{err}");
    let (ok, out, err) = tagllm(&["info", "--model", p]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["config"]["num_layers"], 2);
    let (ok, out, _) = tagllm(&[
        "generate",
        "--raw",
        "--json",
        "--model",
        p,
        "--max-new-tokens",
        "4",
        "the cat",
    ]);
    assert!(ok);
    assert!(json(&out)["ids"].as_array().unwrap().len() <= 4);
}

#[test]
fn a_missing_model_fails_with_a_message() {
    let (ok, _, err) = tagllm(&["info", "--model", "no/such/model.gguf"]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    let (ok, _, err) = tagllm(&["info", "--device", "cuda:0"]);
    assert!(!ok);
    if !cfg!(feature = "cuda") {
        assert!(err.contains("needs a CUDA build"), "{err}");
    }
}
