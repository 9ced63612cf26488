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
    let model = tiny_model(dir.path());
    let (mut server, url) = spawn_server(dir.path(), &model, &[]).await;
    let http = reqwest::Client::new();
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

    let status = sigterm_and_wait(&mut server, std::time::Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

/// A tiny model written by `tagllm tiny-model` into `dir`.
fn tiny_model(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("tiny.gguf");
    let (ok, _, err) = tagllm(&["tiny-model", "--out", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    model
}

/// `tagllm serve` on `model` with `extra` flags, its tags and data in `dir`, once ready.
async fn spawn_server(
    dir: &std::path::Path,
    model: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .args(["serve", "--port", &port.to_string()])
        .arg("--model")
        .arg(model)
        .arg("--tags-dir")
        .arg(dir.join("tags"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
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
    (server, url)
}

/// Sends SIGTERM and waits for the process to exit, at most `within`.
fn sigterm_and_wait(
    server: &mut std::process::Child,
    within: std::time::Duration,
) -> std::process::ExitStatus {
    // SAFETY: signals the child process this test started.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    wait_exit(server, within)
}

/// Waits for the process to exit, at most `within` (then kills it and fails).
fn wait_exit(
    server: &mut std::process::Child,
    within: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(s) = server.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() >= deadline {
            let _ = server.kill();
            panic!("still running {within:?} after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Reads from `conn` until the server closes it (or `within` passes): what it sent.
async fn read_until_closed(
    conn: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&got).into_owned())
}

/// Found by an outside probe: a partial header, a partial body or an idle connection was
/// held open indefinitely. Each is now cut off after its read timeout (1 s here), a
/// stalled body with a 408 JSON error; and past `--max-connections`, a new connection
/// waits until a held one is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let dir = tempdir();
    let model = tiny_model(dir.path());
    let flags = [
        "--header-read-timeout-secs",
        "1",
        "--body-read-timeout-secs",
        "1",
        "--max-connections",
        "4",
        "--no-worker",
    ];
    let (mut server, url) = spawn_server(dir.path(), &model, &flags).await;
    let addr = url.trim_start_matches("http://").to_string();
    let closes = std::time::Duration::from_secs(5);

    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert!(
        read_until_closed(&mut idle, closes).await.is_some(),
        "an idle connection stayed open"
    );

    let mut partial_header = TcpStream::connect(&addr).await.unwrap();
    partial_header
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut partial_header, closes)
            .await
            .is_some(),
        "a partial header was waited on"
    );

    let mut partial_body = TcpStream::connect(&addr).await.unwrap();
    partial_body
        .write_all(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inpu")
        .await
        .unwrap();
    let answer = read_until_closed(&mut partial_body, closes)
        .await
        .expect("a partial body was waited on");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("\"error_type\":\"request_timeout\""),
        "{answer}"
    );

    // Four connections held (each mid-header), then a fifth request: it is answered only
    // once the server has closed the held ones (their header timeout).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    for mut c in held {
        assert!(
            read_until_closed(&mut c, std::time::Duration::from_millis(100))
                .await
                .is_some(),
            "the fifth connection was served while four were held"
        );
    }
    let status = sigterm_and_wait(&mut server, std::time::Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

/// Found by an outside probe: with a streamed generation running, the server outlived
/// SIGTERM for as long as the client stayed. Shutdown ends the stream with an `error`
/// event saying so, and the process exits. On the default model, whose 500 tokens take
/// seconds to decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_streamed_generation_and_the_process_exits() {
    use futures_util::StreamExt;
    let dir = tempdir();
    let model = root().join(tagllm::model::DEFAULT_MODEL_PATH);
    let (mut server, url) = spawn_server(dir.path(), &model, &["--no-worker"]).await;
    let r = reqwest::Client::new()
        .post(format!("{url}/predict"))
        .json(&serde_json::json!({"template": "Write a long story about a cat.\n{x}", "inputs": ["Once"],
            "stream": true, "parameters": {"max_new_tokens": 500, "temperature": 0.8, "seed": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("event: token") {
        let chunk = body.next().await.expect("the stream ended early").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // SAFETY: signals the child process this test started.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let read_rest = async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), read_rest)
        .await
        .expect("the stream outlived SIGTERM");
    assert!(
        !text.contains("event: done"),
        "the generation finished first: {text}"
    );
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("shutting_down"), "{text}");
    let status = wait_exit(&mut server, std::time::Duration::from_secs(15));
    assert!(status.success(), "{status}");
}
