//! Training over HTTP on the tiny model: jobs queue, run on the embedded worker, publish
//! their tags (which /predict then serves), stream progress, cancel, and bad requests get
//! useful 4xx errors. Runs against SQLite, or Postgres when TAGLLM_TEST_DATABASE_URL is set.

mod common;

use std::time::Duration;

use common::server::{start, Options, TestServer};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (StatusCode, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(s: &TestServer, path: &str, body: Value) -> (StatusCode, Value) {
    call(
        reqwest::Method::POST,
        format!("{}{path}", s.url),
        Some(body),
    )
    .await
}

async fn get(s: &TestServer, path: &str) -> (StatusCode, Value) {
    call(reqwest::Method::GET, format!("{}{path}", s.url), None).await
}

async fn wait_state(s: &TestServer, id: &str, want: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, job) = get(s, &format!("/jobs/{id}")).await;
        if job["state"] == want {
            return job;
        }
        assert!(
            !["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()),
            "job ended {}, wanted {want}: {job}",
            job["state"]
        );
        assert!(
            std::time::Instant::now() < deadline,
            "job never reached {want}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn molecules(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let smiles = "CCO".repeat(1 + i % 4) + &"N".repeat(i % 3);
            json!({"smiles": smiles, "qed": smiles.len() as f64 / 10.0})
        })
        .collect()
}

fn text(n: usize) -> Vec<Value> {
    let texts = ["CCO and CCN", "c1ccccc1 ring", "CC(=O)O acid"];
    (0..n).map(|i| json!({"text": texts[i % 3]})).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage2_job_submitted_over_http_publishes_a_tag_that_predict_serves() {
    let s = start(Options::default()).await;
    // Stage 1: the domain tag, from inline records.
    let (status, acc) = post(
        &s,
        "/train",
        json!({"stage": 1, "tag": "SMILES", "dataset": {"records": text(9)},
        "hyperparameters": {"steps": 8, "batch_size": 3, "learning_rate": 0.01, "num_vectors": 3}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    assert_eq!(acc["state"], "queued");
    let job = wait_state(&s, acc["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(job["published_version"], 1);
    assert_eq!(job["step"], 8);

    // Stage 2: uploaded training data, held-out data from a file under the data root.
    let jsonl: String = molecules(16).iter().map(|r| r.to_string() + "\n").collect();
    let r = reqwest::Client::new()
        .post(format!("{}/datasets?name=mols", s.url))
        .body(jsonl)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let ds: Value = r.json().await.unwrap();
    assert_eq!(ds["records"], 16);
    let eval: String = molecules(6).iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(s.data_root.join("eval.jsonl"), eval).unwrap();
    let (status, acc) = post(&s, "/train", json!({"stage": 2, "tag": "QED", "template": "<SMILES> {smiles} qed <QED>",
        "target": "qed", "head": "regression", "dataset": {"id": ds["id"]}, "eval_dataset": {"path": "eval.jsonl"},
        "hyperparameters": {"steps": 10, "batch_size": 4, "learning_rate": 0.01, "num_vectors": 3, "eval_every": 5}})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    let id = acc["id"].as_str().unwrap().to_string();

    // Progress as server-sent events, until the job ends.
    let events = reqwest::get(format!("{}/jobs/{id}/events", s.url))
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut body = events.bytes_stream();
    let mut seen = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), body.next())
        .await
        .expect("events keep coming")
    {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if seen.contains("\"state\":\"succeeded\"") {
            break;
        }
    }
    assert!(seen.contains("event: progress"), "{seen}");
    let job = wait_state(&s, &id, "succeeded").await;
    assert!(job["eval"]["mse"].is_number(), "{job}");
    assert_eq!(job["attempts"], 1);

    // Its curve (what the console draws): a held-out point at each evaluation step, the
    // last step's training loss, steps in order. (On Postgres this caught the heartbeats of
    // a job with held-out data failing after a job without: store::leases::OptionalFloats.)
    let (status, curve) = get(&s, &format!("/jobs/{id}/curve")).await;
    assert_eq!(status, StatusCode::OK, "{curve}");
    let points = curve["points"].as_array().unwrap();
    let steps: Vec<i64> = points.iter().map(|p| p["step"].as_i64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{curve}");
    let evals: Vec<i64> = points
        .iter()
        .filter(|p| p["eval_loss"].is_number())
        .map(|p| p["step"].as_i64().unwrap())
        .collect();
    assert_eq!(evals, [5, 10], "{curve}");
    assert_eq!(points.last().unwrap()["loss"], job["loss"], "{curve}");
    assert_eq!(get(&s, "/jobs/nope/curve").await.0, StatusCode::NOT_FOUND);

    // The tag is served without a restart, with its head and the frozen domain tag.
    let mut tag = Value::Null;
    for _ in 0..100 {
        tag = get(&s, "/tags/QED").await.1;
        if tag["manifest"]["version"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tag["manifest"]["head"]["type"], "regression", "{tag}");
    assert_eq!(tag["manifest"]["domain_tags"], json!(["SMILES"]));
    let (status, pred) = post(
        &s,
        "/predict",
        json!({"function": "QED", "inputs": ["CCOCCO"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{pred}");
    assert!(pred["predictions"][0]["value"].is_number());
    assert_eq!(pred["tags"], json!({"QED": 1, "SMILES": 1}));
    let (_, list) = get(&s, "/jobs?state=succeeded").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
    // An empty filter, which the document allows, is no filter (it was a 422).
    let (status, list) = get(&s, "/jobs?state=").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
}

/// A stage-1 job of a million steps on the tiny model: running until it is stopped.
async fn submit_endless_job(s: &TestServer) -> String {
    let (status, acc) = post(
        s,
        "/train",
        json!({"stage": 1, "tag": "Long", "dataset": {"records": text(6)},
        "hyperparameters": {"steps": 1000000, "batch_size": 2, "num_vectors": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    acc["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_can_be_cancelled() {
    let s = start(Options::default()).await;
    let id = &submit_endless_job(&s).await;
    wait_state(&s, id, "running").await;
    let (status, job) = call(
        reqwest::Method::DELETE,
        format!("{}/jobs/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["cancel_requested"], true);
    let job = wait_state(&s, id, "cancelled").await;
    assert!(job["step"].as_i64().unwrap() < 1000000);
    assert!(
        !s.tags_dir.join("Long").exists(),
        "a cancelled job publishes nothing"
    );
    let (status, body) = call(
        reqwest::Method::DELETE,
        format!("{}/jobs/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error_type"], "conflict");
    // A queued job is cancelled at once (no worker here to pick it up).
    let idle = start(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let (_, acc) = post(&idle, "/train", json!({"stage": 1, "tag": "Q", "dataset": {"records": text(3)}, "hyperparameters": {"steps": 2}})).await;
    let (status, job) = call(
        reqwest::Method::DELETE,
        format!("{}/jobs/{}", idle.url, acc["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_requests_and_data_get_4xx_with_useful_messages() {
    let s = start(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let base = json!({"stage": 2, "tag": "QED", "template": "{smiles} qed <QED>", "target": "qed", "head": "regression", "dataset": {"records": molecules(4)}});
    let with = |patch: Value| {
        let mut b = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases = vec![
        (
            with(json!({"template": "<SMILES> {smiles} <QED>"})),
            "unknown tag <SMILES>",
        ),
        (
            with(json!({"template": "{name} <QED>"})),
            "missing field `name`",
        ),
        (with(json!({"target": "nope"})), "missing field `nope`"),
        (
            with(
                json!({"dataset": {"records": [{"smiles": "C", "qed": 0.1}, {"smiles": "CC", "qed": "high"}]}}),
            ),
            "line 2: field `qed` is not a number",
        ),
        (with(json!({"dataset": {"records": []}})), "empty"),
        (
            with(json!({"dataset": {"id": "no-such-id"}})),
            "no dataset with id",
        ),
        (
            with(json!({"dataset": {"path": "../../etc/passwd"}})),
            "without `..`",
        ),
        (
            with(json!({"dataset": {"path": "missing.jsonl"}})),
            "no file `missing.jsonl`",
        ),
        (with(json!({"stage": 4})), "stage must be 1, 2 or 3"),
        (with(json!({"template": null})), "need a `template`"),
        (
            with(json!({"hyperparameters": {"learning_rate": 0}})),
            "learning_rate",
        ),
        // Found by an outside probe: accepted, then a worker panic or a write outside
        // --tags-dir.
        (
            with(json!({"hyperparameters": {"batch_size": 1_000_000_000u64}})),
            "batch_size",
        ),
        (
            with(json!({"hyperparameters": {"steps": 1_000_000_000_000u64}})),
            "steps",
        ),
        (
            with(json!({"hyperparameters": {"learning_rate": 1e308}})),
            "learning_rate",
        ),
        (
            with(json!({"tag": "..", "template": "{smiles} <..>"})),
            "not a valid tag name",
        ),
        (
            with(json!({"hyperparameters": {"init": "tag:Nope"}})),
            "no served tag <Nope>",
        ),
        (
            with(
                json!({"head": "classification", "dataset": {"records": [{"smiles": "C", "qed": "a"}]}}),
            ),
            "two distinct labels",
        ),
        // Found by the fuzzer: serde reads a struct from an array of its fields, so
        // `["no-such-id"]` was taken for `{"id": "no-such-id"}`. The schema says object.
        (
            with(json!({"dataset": ["no-such-id"]})),
            "expected a JSON object",
        ),
        (
            with(json!({"eval_dataset": ["no-such-id"]})),
            "expected a JSON object",
        ),
        (
            with(json!({"hyperparameters": [10]})),
            "expected a JSON object",
        ),
        (
            json!([2, "QED", null, "{smiles} qed <QED>", "qed", "regression", {"records": molecules(4)}]),
            "expected a JSON object",
        ),
    ];
    let (status, resp) = get(&s, "/jobs?limit=abc").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    assert_eq!(
        resp["error_type"], "validation",
        "a JSON error, not plain text"
    );
    for (body, mentions) in cases {
        let (status, resp) = post(&s, "/train", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {resp}");
        assert_eq!(resp["error_type"], "validation");
        assert!(
            resp["error"].as_str().unwrap().contains(mentions),
            "{resp} should mention {mentions:?}"
        );
    }
    let (status, resp) = post(
        &s,
        "/train",
        json!({"stage": 2, "tag": "QED", "surprise": true, "dataset": {"records": []}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
    let r = reqwest::Client::new()
        .post(format!("{}/datasets", s.url))
        .body("{\"a\": 1}\n{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("line 2"));
    let r = reqwest::Client::new()
        .post(format!("{}/datasets", s.url))
        .body("x".repeat(2 << 20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (status, resp) = get(&s, "/jobs/nope").await;
    assert_eq!(
        (status, resp["error_type"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _) = get(&s, "/jobs?state=sleeping").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing was queued by any of it.
    let (_, list) = get(&s, "/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
}

/// An open progress stream ends when the server starts shutting down, so graceful
/// shutdown does not wait for its client (it once kept a SIGTERMed server up 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_end_when_the_server_shuts_down() {
    let s = start(Options::default()).await;
    let (status, acc) = post(
        &s,
        "/train",
        json!({"stage": 1, "tag": "Long", "dataset": {"records": text(9)},
        "hyperparameters": {"steps": 100000, "batch_size": 3, "learning_rate": 0.01, "num_vectors": 3}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    let id = acc["id"].as_str().unwrap().to_string();
    let events = reqwest::get(format!("{}/jobs/{id}/events", s.url))
        .await
        .unwrap();
    let mut body = events.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(60), body.next())
        .await
        .expect("a first event");
    assert!(first.is_some());
    s.state.shutdown.send_replace(true);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            chunk.unwrap();
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream stayed open after shutdown began");
    let _ = call(
        reqwest::Method::DELETE,
        format!("{}/jobs/{id}", s.url),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_a_running_job_back_to_the_queue() {
    let mut s = start(Options::default()).await;
    let id = submit_endless_job(&s).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while wait_state(&s, &id, "running").await["step"]
        .as_i64()
        .unwrap()
        < 3
    {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shut_down().await;
    // Back in the queue, claimable at once by another worker, the attempt not counted.
    let store = tagllm::jobs::JobStore::connect(&s.database_url)
        .await
        .unwrap();
    let job = store.get(&id).await.unwrap().unwrap();
    assert_eq!(job.state.as_str(), "queued", "{job:?}");
    assert_eq!(job.worker, None);
    assert_eq!(job.attempts, 0);
    assert!(job.step >= 3, "its progress is kept: {job:?}");
}

/// Every family trains and serves alike: on a tiny qwen2 model (q/k/v biases, its own
/// GGUF layout and pre-tokenizer), a stage-1 and a stage-2 tag go through `POST /train`,
/// and `/predict` serves the regression head and a generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_model_trains_and_serves_tags_over_http() {
    use tagllm::model::Family;
    let dir = common::tempdir();
    let path = dir.path().join("tiny-qwen2.gguf");
    tagllm::model::tiny::write_tiny_gguf_of(
        &path,
        Family::Qwen2,
        candle_core::quantized::GgmlDType::Q8_0,
        42,
        false,
    )
    .unwrap();
    let s = start(Options {
        model: Some(path),
        ..Options::default()
    })
    .await;
    let (status, acc) = post(
        &s,
        "/train",
        json!({"stage": 1, "tag": "SMILES", "dataset": {"records": text(6)},
        "hyperparameters": {"steps": 4, "batch_size": 3, "learning_rate": 0.01, "num_vectors": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    wait_state(&s, acc["id"].as_str().unwrap(), "succeeded").await;
    let (status, acc) = post(
        &s,
        "/train",
        json!({"stage": 2, "tag": "QED", "template": "<SMILES> {smiles} qed <QED>",
        "target": "qed", "head": "regression", "dataset": {"records": molecules(8)},
        "hyperparameters": {"steps": 4, "batch_size": 4, "learning_rate": 0.01, "num_vectors": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    wait_state(&s, acc["id"].as_str().unwrap(), "succeeded").await;
    let mut pred = Value::Null;
    for _ in 0..100 {
        let (status, p) = post(
            &s,
            "/predict",
            json!({"function": "QED", "inputs": ["CCOCCO"]}),
        )
        .await;
        pred = p;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pred["predictions"][0]["value"].is_number(), "{pred}");
    assert_eq!(pred["tags"], json!({"QED": 1, "SMILES": 1}));
    let (status, gen) = post(
        &s,
        "/predict",
        json!({"template": "<SMILES> {smiles} is",
        "inputs": [{"smiles": "CCO"}], "parameters": {"max_new_tokens": 4}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{gen}");
    assert!(gen["predictions"][0]["text"].is_string(), "{gen}");
}

/// Found by an outside probe: with `tags/WriteT` a link to a directory outside, a job
/// training `WriteT` wrote its bundle (and `.lock`) there. The job fails naming the link,
/// and nothing is written through it.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_publishes_through_a_symbolic_link() {
    let s = start(Options::default()).await;
    let outside = s._dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, s.tags_dir.join("WriteT")).unwrap();
    let (status, acc) = post(
        &s,
        "/train",
        json!({"stage": 1, "tag": "WriteT", "dataset": {"records": text(4)},
               "hyperparameters": {"steps": 2, "batch_size": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acc}");
    let job = wait_state(&s, acc["id"].as_str().unwrap(), "failed").await;
    assert!(
        job["error"].as_str().unwrap().contains("symbolic link"),
        "{job}"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let (_, tags) = get(&s, "/tags").await;
    assert!(!tags["tags"].to_string().contains("\"WriteT\""), "{tags}");
}
