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
    // The reference decodes its EOS as `<|im_end|>`; tagllm's text never holds a special
    // token (the EOS stays in `ids`).
    let want = fx["greedy_text"].as_str().unwrap();
    assert!(want.ends_with("<|im_end|>"), "{want}");
    assert_eq!(v["text"], want.trim_end_matches("<|im_end|>"));

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

#[test]
fn train_then_eval_on_the_tiny_model() {
    let dir = tempdir();
    let model = dir.path().join("tiny.gguf");
    let tags = dir.path().join("tags");
    let m = model.to_str().unwrap();
    let t = tags.to_str().unwrap();
    assert!(tagllm(&["tiny-model", "--out", m]).0);
    let text: String = (0..6)
        .map(|i| format!("{{\"text\": \"the cat {i} sat\"}}\n"))
        .collect();
    let labelled: String = (0..12)
        .map(|i| {
            format!(
                "{{\"smiles\": \"{}\", \"y\": {}}}\n",
                "C".repeat(1 + i % 5),
                1 + i % 5
            )
        })
        .collect();
    std::fs::write(dir.path().join("text.jsonl"), text).unwrap();
    std::fs::write(dir.path().join("lab.jsonl"), labelled).unwrap();
    let path = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let (ok, out, err) = tagllm(&[
        "train",
        "--model",
        m,
        "--tags-dir",
        t,
        "--stage",
        "1",
        "--tag",
        "Mol",
        "--data",
        &path("text.jsonl"),
        "--steps",
        "5",
        "--batch-size",
        "2",
        "--num-vectors",
        "2",
        "--learning-rate",
        "0.01",
    ]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["tags"], serde_json::json!(["Mol"]));
    let (ok, out, err) = tagllm(&[
        "train",
        "--model",
        m,
        "--tags-dir",
        t,
        "--stage",
        "2",
        "--tag",
        "Len",
        "--head",
        "regression",
        "--target",
        "y",
        "--template",
        "<Mol> {smiles} has <Len>",
        "--data",
        &path("lab.jsonl"),
        "--eval-data",
        &path("lab.jsonl"),
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--num-vectors",
        "2",
        "--learning-rate",
        "0.02",
    ]);
    assert!(ok, "{err}");
    let trained = json(&out);
    assert!(tags.join("Len/manifest.json").exists() && tags.join("Len/tag.safetensors").exists());
    let (ok, out, err) = tagllm(&[
        "eval",
        "--model",
        m,
        "--tags-dir",
        t,
        "--function",
        "Len",
        "--data",
        &path("lab.jsonl"),
    ]);
    assert!(ok, "{err}");
    let v = json(&out);
    assert_eq!(v["version"], 1);
    // The served tag on the same data reproduces the trainer's held-out metrics.
    let (a, b) = (
        v["metrics"]["mse"].as_f64().unwrap(),
        trained["eval"]["mse"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-3 * b.max(1e-3),
        "eval {a} vs training {b}"
    );
    let (ok, _, err) = tagllm(&[
        "train",
        "--model",
        m,
        "--tags-dir",
        t,
        "--stage",
        "2",
        "--tag",
        "Bad",
        "--head",
        "regression",
        "--target",
        "nope",
        "--template",
        "<Mol> {smiles} <Bad>",
        "--data",
        &path("lab.jsonl"),
        "--steps",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("missing field `nope`"), "{err}");
}

/// (name, nice value) of every thread of process `pid`, from `/proc`.
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            // `rest` starts at field 3 (state); the nice value is field 19.
            Some((name.to_string(), rest.split(' ').nth(16)?.parse().ok()?))
        })
        .collect()
}

/// Every compute thread of a serving process (rayon's, candle's own pool, the engine, the
/// training worker) runs below the threads that answer HTTP, which keep the process's priority.
fn compute_runs_below_http(pid: u32) {
    let threads = thread_priorities(pid);
    let nice_of = |name: &str| threads.iter().find(|(n, _)| n == name).map(|t| t.1);
    let base = nice_of("tagllm").expect("the main thread");
    // The default increment: the server runs without TAGLLM_COMPUTE_NICE.
    let lowered = (base + i64::from(tagllm::model::threads::COMPUTE_NICE_INCREMENT)).min(19);
    let is_compute = |n: &str| {
        n.starts_with("compute-")
            || n.starts_with("candle-bp-")
            || n == "inference"
            || n == "training-worker"
    };
    for (name, nice) in &threads {
        let want = if is_compute(name) { lowered } else { base };
        assert_eq!(*nice, want, "thread {name}: {threads:?}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for prefix in ["compute-", "inference"] {
        assert!(
            threads.iter().any(|(n, _)| n.starts_with(prefix)),
            "no {prefix} thread: {threads:?}"
        );
    }
    if cores > 1 {
        assert!(
            threads.iter().any(|(n, _)| n.starts_with("candle-bp-")),
            "candle's pool: {threads:?}"
        );
    }
}

/// `tagllm serve` as a process, end to end: ready, a generation, the console, a training
/// job run by its embedded worker and hot-loaded, then SIGTERM ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_end_to_end_as_a_process_and_stops_on_sigterm() {
    let dir = tempdir();
    let model = dir.path().join("tiny.gguf");
    let (ok, _, err) = tagllm(&["tiny-model", "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--model",
            model.to_str().unwrap(),
        ])
        .arg("--tags-dir")
        .arg(dir.path().join("tags"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("TAGLLM_COMPUTE_NICE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/ready")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        assert!(server.try_wait().unwrap().is_none(), "the server exited");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let predict = |body: serde_json::Value| http.post(format!("{url}/predict")).json(&body).send();
    let r = predict(serde_json::json!({"template": "{x}", "inputs": ["the cat"],
        "parameters": {"max_new_tokens": 4}}))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["predictions"][0]["ids"].as_array().unwrap().len(),
        4,
        "{v}"
    );
    let page = http.get(format!("{url}/")).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("tagllm console"));
    compute_runs_below_http(server.id());

    let records: Vec<_> = (0..6)
        .map(|i| serde_json::json!({"text": format!("the cat {i} sat on the mat")}))
        .collect();
    let r = http
        .post(format!("{url}/train"))
        .json(
            &serde_json::json!({"stage": 1, "tag": "Cat", "dataset": {"records": records},
            "hyperparameters": {"steps": 3, "batch_size": 2}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tags: serde_json::Value = http
            .get(format!("{url}/tags"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if tags["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "Cat")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never published <Cat>"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let r = predict(
        serde_json::json!({"template": "<Cat> {x}", "inputs": ["the"],
        "parameters": {"max_new_tokens": 2}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "the trained tag composes");

    // SAFETY: signals the child process this test started.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
