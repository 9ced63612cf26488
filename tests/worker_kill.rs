//! A worker process killed with SIGKILL mid-job loses nothing: another worker takes the
//! job over when the lease runs out, resumes from the last checkpoint, and publishes
//! exactly one complete tag.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{start, Options};
use serde_json::{json, Value};
use tagllm::tags::{BaseModelIdentity, Registry};

fn spawn_worker(s: &common::server::TestServer) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tagllm"))
        .args([
            "worker",
            "--database-url",
            &s.database_url,
            "--tags-dir",
            s.tags_dir.to_str().unwrap(),
        ])
        .args([
            "--model",
            s.model_path.to_str().unwrap(),
            "--lease-seconds",
            "2",
            "--checkpoint-every",
            "5",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn job(s: &common::server::TestServer, id: &str) -> Value {
    reqwest::get(format!("{}/jobs/{id}", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_resumes_from_the_checkpoint_and_publishes_once() {
    let s = start(Options {
        worker: false,
        ..Default::default()
    })
    .await;
    let texts = ["CCO and CCN", "c1ccccc1 ring", "CC(=O)O acid", "the cat"];
    let records: Vec<Value> = (0..8).map(|i| json!({"text": texts[i % 4]})).collect();
    let body = json!({"stage": 1, "tag": "Dom", "dataset": {"records": records},
        "hyperparameters": {"steps": 1500, "batch_size": 2, "learning_rate": 0.01, "num_vectors": 2}});
    let r = reqwest::Client::new()
        .post(format!("{}/train", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut first = spawn_worker(&s);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = job(&s, &id).await;
        assert_ne!(
            j["state"], "succeeded",
            "the job finished before the worker could be killed; make it longer"
        );
        if j["step"].as_i64().unwrap_or(0) >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never made progress: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(
        !s.tags_dir.join("Dom").exists(),
        "a killed job must not leave a tag behind"
    );

    let mut second = spawn_worker(&s);
    let finished = loop {
        let j = job(&s, &id).await;
        if j["state"] != "running" && j["state"] != "queued" {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "the job was never taken over: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert_eq!(finished["attempts"], 2, "{finished}");
    assert!(
        finished["resumed_from_step"].as_i64().unwrap() >= 5,
        "resumed from a checkpoint, not from scratch: {finished}"
    );
    assert_eq!(finished["step"], 1500);
    assert_eq!(finished["published_version"], 1);

    // Exactly one complete bundle, which validates and loads.
    let entries: Vec<_> = std::fs::read_dir(&s.tags_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, vec!["Dom".to_string()]);
    let m = &s.predictor().model;
    let reg = Registry::open(
        &s.tags_dir,
        BaseModelIdentity::of(m),
        candle_core::Device::Cpu,
    )
    .unwrap();
    let set = reg.snapshot();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    assert_eq!(set.get("Dom").unwrap().version(), 1);
}
