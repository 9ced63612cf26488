//! `/predict` under load on the default model: requests/s and p50/p99 latency of
//! regression-style predictions (64-token inputs) at 1, 8 and 32 concurrent clients, with
//! dynamic batching on and off, and the HTTP server's overhead over the bare engine; then
//! admission by work under overload: 256 concurrent clients against the default queue
//! budget, with the p99 latency of admitted requests, of the 429s and of `/health` polled
//! throughout; then generation:
//! tokens/s of one client alone and of 16 concurrent clients, and head-request latency
//! idle vs. while 16 generations decode, with f32 and with q8_0 serving weights.
//!
//! Then the serving mix (`mix`, the default engine settings): N clients of 64-token
//! generations (N = 1, 16, 64) next to `DecodeBatch` decoding the same prompts in-process at
//! the same N (the core bench's `decode_batch`), in the same run; a one-input head request
//! while one request of 8 x ~1,000-token prompts generates; a single head request on an
//! idle server next to the bare forward of the same sequence; 64 clients sending one-input
//! head requests for 30 s (retrying at once, and honouring `Retry-After`) against one
//! 64-input request; 256 and 1,000 clients at once (only 200s and 429s, RSS before/after).
//!
//! Run: `cargo bench --bench serve` (after scripts/setup-model.sh); `cargo bench --bench
//! serve -- mix` runs one section, `-- mix generations` (or `single_head`, `head_during`,
//! `storm`, `overload`) one part of it. The server runs
//! in-process on a loopback port; the tag is synthetic (seeded vectors and head), which
//! costs exactly what a trained one costs. Prints one JSON line per measurement.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tagllm::http::ServerConfig;
use tagllm::infer::{EngineConfig, Input, Limits, Predictor, Prompt, Request};
use tagllm::model::{BaseModel, DecodeBatch, Decoder, GenerationParams, Mode, Precision};
use tagllm::service::{Service, ServiceConfig};
use tagllm::tags::{Head, HeadSpec, TagBundle, TagKind, TagManifest};

const TEMPLATE: &str = "The SMILES of the molecule is <SMILES> {smiles}. The druglikeness is <QED>";

fn tag(
    name: &str,
    kind: TagKind,
    head: Option<HeadSpec>,
    fingerprint: &str,
    d: usize,
) -> TagBundle {
    let vectors = (Tensor::randn(0f32, 1.0, (10, d), &Device::Cpu).unwrap() * 0.05).unwrap();
    let head = head.clone().map(|spec| Head {
        spec,
        positions: 1,
        hidden: None,
        weight: (Tensor::randn(0f32, 1.0, (1, d), &Device::Cpu).unwrap() * 0.01).unwrap(),
        bias: Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    });
    TagBundle {
        manifest: TagManifest {
            name: name.into(),
            kind,
            version: 1,
            num_vectors: 10,
            hidden_size: d,
            base_model: fingerprint.into(),
            head_positions: 1,
            head_hidden: 0,
            head: head.as_ref().map(|h| h.spec.clone()),
            template: (kind == TagKind::Function).then(|| TEMPLATE.to_string()),
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: json!({"synthetic": "benchmark"}),
            metrics: serde_json::Value::Null,
        },
        vectors,
        head,
        source: "bundle",
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Inputs whose composed sequence is 64 tokens (template + tags + SMILES).
fn inputs(p: &Predictor) -> Vec<String> {
    let fixed = p
        .model
        .tokenizer
        .encode_fragment(
            &TEMPLATE
                .replace("<SMILES>", "")
                .replace("<QED>", "")
                .replace("{smiles}", ""),
        )
        .unwrap()
        .len()
        + 20;
    let base = "CC(=O)Oc1ccccc1C(=O)OCCN(CC)CCOc1ccc(Cl)cc1C(=O)NCCCCOCC(F)(F)F";
    (0..64)
        .map(|i| {
            let mut s: String = base.chars().cycle().skip(i).take(80).collect();
            while p.model.tokenizer.encode_fragment(&s).unwrap().len() > 64 - fixed {
                s.pop();
            }
            s
        })
        .collect()
}

/// Requests/s and latencies (sorted) of `clients` clients sending `per_client` requests
/// each, one after another; every request must succeed.
async fn load(url: &str, clients: usize, per_client: usize, smiles: &[String]) -> (f64, Vec<f64>) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, smiles) = (client.clone(), url.to_string(), smiles.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in 0..per_client {
                let body =
                    json!({"function": "QED", "inputs": [smiles[(c * 7 + i) % smiles.len()]]});
                let t = Instant::now();
                let r = client
                    .post(format!("{url}/predict"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                r.bytes().await.unwrap();
                lat.push(t.elapsed().as_secs_f64());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (all.len() as f64 / secs, all)
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One client's kept HTTP/1.1 connection, written and read by hand as wrk does: the
/// requests' bytes are made before the burst, so that the clients' own work, on the
/// cores the server uses too, stays small next to the server's.
struct RawConnection(tokio::io::BufReader<tokio::net::TcpStream>);

impl RawConnection {
    async fn open(addr: &str) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self(tokio::io::BufReader::new(stream))
    }

    /// Sends one whole request and reads the response; returns its status.
    async fn exchange(&mut self, request: &[u8]) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        self.0.get_mut().write_all(request).await.unwrap();
        let (mut status, mut length) = (0u16, 0usize);
        let mut line = String::new();
        loop {
            line.clear();
            self.0.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
            } else if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).await.unwrap();
        status
    }
}

/// `POST /predict` of one SMILES string, as the bytes on the wire.
fn predict_request(host: &str, smiles: &str) -> Vec<u8> {
    let body = json!({"function": "QED", "inputs": [smiles]}).to_string();
    format!(
        "POST /predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `clients` clients that fire `per_client` requests each, all at once: admitted
/// requests/s, admitted latencies and refused (429) latencies, sorted. With `connected`,
/// every client opens its connection before the burst (a pool's kept connection);
/// otherwise each connects inside it.
async fn burst(
    url: &str,
    clients: usize,
    per_client: usize,
    smiles: &[String],
    connected: bool,
) -> (f64, Vec<f64>, Vec<f64>) {
    let addr = url.trim_start_matches("http://").to_string();
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let requests: Vec<Vec<u8>> = (0..per_client)
            .map(|i| predict_request(&addr, &smiles[(c * 7 + i) % smiles.len()]))
            .collect();
        let (addr, start) = (addr.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = if connected {
                Some(RawConnection::open(&addr).await)
            } else {
                None
            };
            start.wait().await;
            let (mut ok, mut refused) = (Vec::new(), Vec::new());
            for request in &requests {
                let t = Instant::now();
                if conn.is_none() {
                    conn = Some(RawConnection::open(&addr).await);
                }
                let status = conn.as_mut().unwrap().exchange(request).await;
                let secs = t.elapsed().as_secs_f64();
                match status {
                    200 => ok.push(secs),
                    429 => refused.push(secs),
                    other => panic!("status {other}"),
                }
            }
            (ok, refused)
        }));
    }
    start.wait().await;
    let started = Instant::now();
    let (mut all, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (ok, no) = t.await.unwrap();
        all.extend(ok);
        refused.extend(no);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    refused.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (all.len() as f64 / secs, all, refused)
}

/// The cumulative bucket counts `(le, count)` of `tagllm_request_duration_seconds{labels}`
/// in a Prometheus text exposition.
fn histogram_buckets(metrics: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("tagllm_request_duration_seconds_bucket{{{labels},le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound, in ms, of the histogram bucket holding quantile `q` of
/// `tagllm_request_duration_seconds{labels}` over the requests between two expositions.
fn histogram_quantile_ms(before: &str, after: &str, labels: &str, q: f64) -> f64 {
    let earlier = histogram_buckets(before, labels);
    let buckets: Vec<(f64, f64)> = histogram_buckets(after, labels)
        .into_iter()
        .map(|(le, count)| {
            let old = earlier.iter().find(|(l, _)| *l == le).map_or(0.0, |b| b.1);
            (le, count - old)
        })
        .collect();
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1e3)
}

/// Runs `f` to completion on a new runtime with one thread of its own.
async fn on_client_runtime<F, T>(f: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .await
    .unwrap()
}

/// Latencies of `GET /health`, polled every 50 ms while `polling` holds.
async fn health_latencies(url: String, polling: Arc<AtomicBool>) -> Vec<f64> {
    let client = reqwest::Client::new();
    let mut lat = Vec::new();
    while polling.load(Ordering::SeqCst) {
        let t = Instant::now();
        let r = client.get(format!("{url}/health")).send().await.unwrap();
        assert!(r.status().is_success());
        r.bytes().await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat
}

/// One generation through /predict; returns (new tokens, seconds).
async fn generate_once(
    client: &reqwest::Client,
    url: &str,
    i: usize,
    max_new: usize,
) -> (usize, f64) {
    let body = json!({
        "template": "<|im_start|>user\nTell a long story about {x}.<|im_end|>\n<|im_start|>assistant\n",
        "inputs": [format!("molecule number {i}")],
        "parameters": {"max_new_tokens": max_new},
    });
    let t = Instant::now();
    let r = client
        .post(format!("{url}/predict"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    let n = v["predictions"][0]["ids"].as_array().map_or(0, Vec::len);
    (n, t.elapsed().as_secs_f64())
}

/// Generation tokens/s alone and with 16 concurrent clients, and head latency (p50 of
/// sequential requests) idle vs. while 16 generations decode.
async fn generation_bench(url: &str, smiles: &[String], precision: &str) {
    let client = reqwest::Client::new();
    generate_once(&client, url, 0, 8).await; // warm-up
    let (mut tokens, mut secs) = (0, 0.0);
    for i in 0..3 {
        let (n, s) = generate_once(&client, url, i, 64).await;
        tokens += n;
        secs += s;
    }
    let alone = tokens as f64 / secs;
    let concurrent = |clients: usize, max_new: usize| {
        let (client, url) = (client.clone(), url.to_string());
        (0..clients)
            .map(|i| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { generate_once(&client, &url, i, max_new).await })
            })
            .collect::<Vec<_>>()
    };
    let started = Instant::now();
    let mut total = 0;
    for t in concurrent(16, 64) {
        total += t.await.unwrap().0;
    }
    let together = total as f64 / started.elapsed().as_secs_f64();
    let (_, idle) = load(url, 1, 10, smiles).await;
    let busy_tasks = concurrent(16, 256);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, busy) = load(url, 1, 10, smiles).await;
    for t in busy_tasks {
        t.await.unwrap();
    }
    let ms = |v: &[f64]| (percentile(v, 0.5) * 1e4).round() / 10.0;
    println!(
        "{}",
        json!({"bench": "generation", "precision": precision,
               "tokens_per_s_alone": (alone * 10.0).round() / 10.0,
               "tokens_per_s_16_clients": (together * 10.0).round() / 10.0,
               "speedup_16": (together / alone * 100.0).round() / 100.0,
               "head_p50_idle_ms": ms(&idle), "head_p50_during_16_generations_ms": ms(&busy),
               "head_slowdown": (percentile(&busy, 0.5) / percentile(&idle, 0.5) * 100.0).round() / 100.0})
    );
}

/// `POST /predict` with `body`.
async fn post_predict(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(format!("{url}/predict"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// This process's resident memory, in MB.
fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.split("VmRSS:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024)
}

const CHAT: &str =
    "<|im_start|>user\nTell a long story about {x}.<|im_end|>\n<|im_start|>assistant\n";

/// `DecodeBatch` on the served model, in-process, over the prompts the HTTP clients send:
/// decoding tokens/s (steps only) and with the batched prefill.
fn decode_batch_reference(served: &BaseModel, n: usize, steps: usize) -> (f64, f64) {
    let params = GenerationParams {
        max_new_tokens: steps,
        ..Default::default()
    };
    let prompts: Vec<candle_core::Tensor> = (0..n)
        .map(|i| {
            served
                .embed_text(&CHAT.replace("{x}", &format!("molecule number {i}")))
                .unwrap()
        })
        .collect();
    let run = || {
        let t = Instant::now();
        let mut b = DecodeBatch::new(served);
        let joining = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, Decoder::new(served, p, &params).unwrap()))
            .collect();
        let mut tokens = 0;
        for (_, r) in b.join(served, joining, 4096) {
            if let Some(d) = r.unwrap() {
                tokens += d.ids().len();
            }
        }
        let decoding = Instant::now();
        while !b.is_empty() {
            for (h, finished) in b.step(served).unwrap() {
                if finished {
                    tokens += b.leave(h).unwrap().unwrap().ids().len();
                }
            }
        }
        let d = decoding.elapsed().as_secs_f64();
        (tokens, d, t.elapsed().as_secs_f64())
    };
    run(); // warm-up
    let (tokens, decode, total) = run();
    // The first token of each comes with the prefill, not from a step.
    ((tokens - n) as f64 / decode, tokens as f64 / total)
}

/// `n` clients at once, each one 64-token generation: statuses and aggregate tokens/s.
async fn concurrent_generations(
    url: &str,
    n: usize,
) -> (std::collections::BTreeMap<u16, usize>, f64) {
    let client = reqwest::Client::new();
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let body = json!({"template": CHAT, "inputs": [format!("molecule number {i}")],
                                  "parameters": {"max_new_tokens": 64}});
                let r = post_predict(&client, &url, &body).await;
                let status = r.status().as_u16();
                let v: serde_json::Value = r.json().await.unwrap();
                (
                    status,
                    v["predictions"][0]["ids"].as_array().map_or(0, Vec::len),
                )
            })
        })
        .collect();
    let (mut statuses, mut tokens) = (std::collections::BTreeMap::new(), 0);
    for t in tasks {
        let (status, n) = t.await.unwrap();
        *statuses.entry(status).or_insert(0) += 1;
        tokens += n;
    }
    (statuses, tokens as f64 / t.elapsed().as_secs_f64())
}

async fn info_pace(url: &str) -> f64 {
    let v: serde_json::Value = reqwest::get(format!("{url}/info"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["limits"]["pace_units_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// `clients` clients sending one-input head requests for `secs` over kept connections,
/// retrying a 429 at once or after its `Retry-After`: served inputs/s, refusals.
async fn storm(
    url: &str,
    clients: usize,
    secs: f64,
    smiles: &[String],
    polite: bool,
) -> (f64, usize, usize) {
    let addr = url.trim_start_matches("http://").to_string();
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let request = predict_request(&addr, &smiles[c % smiles.len()]);
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut conn = RawConnection::open(&addr).await;
                let (mut ok, mut refused) = (0, 0);
                while Instant::now() < stop {
                    match conn.exchange(&request).await {
                        200 => ok += 1,
                        429 => {
                            refused += 1;
                            if polite {
                                // Retry-After is whole seconds, at least one.
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        other => panic!("status {other}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    (ok as f64 / started.elapsed().as_secs_f64(), ok, refused)
}

/// The serving mix on the default engine settings (see the module doc).
async fn mix_bench(url: &str, p: &Predictor, smiles: &[String], part: Option<&str>) {
    let wanted = |name: &str| part.is_none_or(|p| p == name);
    let served = p.model.at_precision(p.engine_config.precision).unwrap();
    for n in [1usize, 16, 64]
        .into_iter()
        .filter(|_| wanted("generations"))
    {
        let (decode_only, with_prefill) = decode_batch_reference(&served, n, 64);
        concurrent_generations(url, n.min(4)).await; // warm-up
        let (statuses, http) = concurrent_generations(url, n).await;
        println!(
            "{}",
            json!({"bench": "mix_generations", "clients": n, "precision": p.engine_config.precision.name(),
                   "statuses": statuses, "http_tokens_per_s": (http * 10.0).round() / 10.0,
                   "decode_batch_tokens_per_s": (decode_only * 10.0).round() / 10.0,
                   "decode_batch_with_prefill_tokens_per_s": (with_prefill * 10.0).round() / 10.0,
                   "http_over_decode_batch": (http / decode_only * 1000.0).round() / 1000.0,
                   "http_over_decode_batch_with_prefill": (http / with_prefill * 1000.0).round() / 1000.0})
        );
    }

    // A single head request, idle, next to the bare forward of its sequence.
    if wanted("single_head") {
        single_head(url, p).await;
    }
    if wanted("head_during") {
        head_during_long_generation(url).await;
    }
    if wanted("storm") {
        storms(url, smiles).await;
    }
    if wanted("overload") {
        overload(url, smiles).await;
    }
}

async fn single_head(url: &str, p: &Predictor) {
    let tags = p.registry.snapshot();
    let tpl = tagllm::tags::Template::parse(TEMPLATE);
    let composed = tagllm::infer::compose(
        &p.model,
        &tags,
        &tpl,
        &Input::Text("CCO".into()),
        Some("QED"),
        1024,
    )
    .unwrap();
    let x = composed.embed(&p.model, 0).unwrap().unsqueeze(0).unwrap();
    let mut bare = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let h = p.model.llama.forward(&x, None, None, Mode::Fast).unwrap();
        h.narrow(1, composed.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        bare.push(t.elapsed().as_secs_f64());
    }
    bare.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let one = vec!["CCO".to_string()];
    load(url, 1, 3, &one).await;
    let (_, http) = load(url, 1, 21, &one).await;
    println!(
        "{}",
        json!({"bench": "mix_single_head", "tokens": composed.len(),
               "http_p50_ms": (percentile(&http, 0.5) * 1e4).round() / 10.0,
               "forward_p50_ms": (percentile(&bare, 0.5) * 1e4).round() / 10.0,
               "ratio": (percentile(&http, 0.5) / percentile(&bare, 0.5) * 100.0).round() / 100.0})
    );
}

/// A head request while 8 x ~1,000-token prompts are prefilled and decoded.
async fn head_during_long_generation(url: &str) {
    let one = vec!["CCO".to_string()];
    let long = "the quick brown fox jumps over the lazy dog and ".repeat(100);
    let long: String = long.split(' ').take(900).collect::<Vec<_>>().join(" ");
    let body =
        json!({"template": "{x}", "inputs": vec![long; 8], "parameters": {"max_new_tokens": 32}});
    let (client, u) = (reqwest::Client::new(), url.to_string());
    let big = tokio::spawn(async move {
        let t = Instant::now();
        let r = post_predict(&client, &u, &body).await;
        (r.status().as_u16(), t.elapsed().as_secs_f64())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut during = Vec::new();
    for _ in 0..5 {
        let (_, lat) = load(url, 1, 1, &one).await;
        during.push(lat[0]);
    }
    let (big_status, big_secs) = big.await.unwrap();
    during.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{}",
        json!({"bench": "mix_head_during_long_generation", "head_statuses": "200 (asserted)",
               "head_p50_s": (percentile(&during, 0.5) * 1e3).round() / 1e3,
               "head_max_s": (percentile(&during, 1.0) * 1e3).round() / 1e3,
               "generation_status": big_status, "generation_s": (big_secs * 10.0).round() / 10.0})
    );
}

/// 64 clients of one-input requests for 30 s against one 64-input request.
async fn storms(url: &str, smiles: &[String]) {
    let inputs: Vec<String> = (0..64).map(|i| smiles[i % smiles.len()].clone()).collect();
    let t = Instant::now();
    let r = post_predict(
        &reqwest::Client::new(),
        url,
        &json!({"function": "QED", "inputs": inputs}),
    )
    .await;
    assert!(r.status().is_success());
    r.bytes().await.unwrap();
    let one_request = 64.0 / t.elapsed().as_secs_f64();
    for polite in [false, true] {
        let before = info_pace(url).await;
        let (u, s) = (url.to_string(), smiles.to_vec());
        let (served_per_s, ok, refused) =
            on_client_runtime(async move { storm(&u, 64, 30.0, &s, polite).await }).await;
        println!(
            "{}",
            json!({"bench": "mix_storm", "clients": 64, "seconds": 30, "retry": if polite { "after Retry-After" } else { "at once" },
                   "served": ok, "refused": refused, "served_inputs_per_s": (served_per_s * 100.0).round() / 100.0,
                   "one_64_input_request_inputs_per_s": (one_request * 100.0).round() / 100.0,
                   "ratio": (served_per_s / one_request * 1000.0).round() / 1000.0,
                   "pace_before": before.round(), "pace_after": info_pace(url).await.round()})
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Overload: every client at once, four requests each.
async fn overload(url: &str, smiles: &[String]) {
    for clients in [256usize, 1000] {
        let rss_before = rss_mb();
        let before = metrics(url).await;
        let (u, s) = (url.to_string(), smiles.to_vec());
        let (_, ok, refused) =
            on_client_runtime(async move { burst(&u, clients, 4, &s, true).await }).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!(
            "{}",
            json!({"bench": "mix_overload", "clients": clients, "admitted": ok.len(), "refused_429": refused.len(),
                   "statuses": "200/429 only (asserted)",
                   "admitted_p99_ms": (percentile(&ok, 0.99) * 1e3).round(),
                   "refused_p99_ms_server_side_at_most": histogram_quantile_ms(&before, &metrics(url).await, "route=\"/predict\",status=\"429\"", 0.99),
                   "rss_mb_before": rss_before, "rss_mb_after": rss_mb()})
        );
    }
}

#[tokio::main]
async fn main() {
    let model =
        std::env::var("TAGLLM_MODEL").unwrap_or_else(|_| tagllm::model::DEFAULT_MODEL_PATH.into());
    let tags_dir = tempfile::tempdir().unwrap();
    // (batching, admission, generation): throughput with batching on and off and no queue
    // budget to speak of, then the default queue budget under overload, then generation
    // at each serving precision.
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    for (batching, admission, generation) in [
        (true, true, Some(Precision::Auto)),
        (true, false, None),
        (false, false, None),
        (true, true, None),
        (true, false, Some(Precision::F32)),
        (true, false, Some(Precision::Q8_0)),
    ] {
        let section = match (batching, admission, generation) {
            (_, true, Some(_)) => "mix",
            (_, _, Some(_)) => "generation",
            (_, true, _) => "admission",
            _ => "predict",
        };
        if only.as_deref().is_some_and(|o| o != section) {
            continue;
        }
        // Batching off: a one-token budget makes every request its own forward pass.
        let engine = EngineConfig {
            max_batch_tokens: if batching { 4096 } else { 1 },
            max_queue_wait: if admission {
                EngineConfig::default().max_queue_wait
            } else {
                Duration::from_secs(3600)
            },
            precision: generation.unwrap_or_default(),
            ..Default::default()
        };
        let data = tempfile::tempdir().unwrap();
        // The service as `tagllm serve` assembles it (no training worker).
        let mut service = Service::start(ServiceConfig {
            server: ServerConfig {
                max_concurrent_requests: if section == "mix" { 512 } else { 256 },
                max_body_bytes: 1 << 20,
                ..Default::default()
            },
            model_path: model.clone().into(),
            device: Device::Cpu,
            tags_dir: tags_dir.path().to_path_buf(),
            watch: false,
            limits: Limits::default(),
            engine: engine.clone(),
            database_url: format!("sqlite://{}", data.path().join("jobs.db").display()),
            worker: None,
        })
        .await
        .unwrap();
        service
            .loaded()
            .await
            .expect("run scripts/setup-model.sh first");
        let p = service.state.predictor.get().unwrap().clone();
        let (fp, d) = (p.model.fingerprint.clone(), p.model.config().hidden_size);
        tag("SMILES", TagKind::Domain, None, &fp, d)
            .save(tags_dir.path())
            .unwrap();
        tag(
            "QED",
            TagKind::Function,
            Some(HeadSpec::Regression {
                target_mean: 0.5,
                target_std: 0.2,
                range: None,
            }),
            &fp,
            d,
        )
        .save(tags_dir.path())
        .unwrap();
        p.registry.rescan();
        let smiles = inputs(&p);
        let listener = tagllm::http::listen("127.0.0.1", 0).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(service.serve(listener));

        if section == "mix" {
            let part = std::env::args().nth(2).filter(|a| !a.starts_with('-'));
            mix_bench(&url, &p, &smiles, part.as_deref()).await;
            continue;
        }
        if let Some(precision) = generation {
            generation_bench(&url, &smiles, precision.name()).await;
            continue;
        }
        if admission {
            // Warm-up, one request at a time (never refused: an empty queue takes any request).
            load(&url, 1, 8, &smiles).await;
            let clients = 256;
            // Kept connections (each client connected before the burst, as a load
            // balancer's or a client pool's would be) first, then every client opening
            // its connection inside the burst.
            for connected in [true, false] {
                let before = metrics(&url).await;
                // The clients run on a runtime of their own, as another process would, so
                // the server's runtime threads serve only the server; /health is polled
                // throughout the overload (a probe must keep its answer fast).
                let (u, s) = (url.clone(), smiles.clone());
                let ((rps, ok, refused), mut health) = on_client_runtime(async move {
                    let polling = Arc::new(AtomicBool::new(true));
                    let poller = tokio::spawn(health_latencies(u.clone(), polling.clone()));
                    let load = burst(&u, clients, 4, &s, connected).await;
                    polling.store(false, Ordering::SeqCst);
                    (load, poller.await.unwrap())
                })
                .await;
                health.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let server_429_p99_ms = histogram_quantile_ms(
                    &before,
                    &metrics(&url).await,
                    "route=\"/predict\",status=\"429\"",
                    0.99,
                );
                let pct = |v: &[f64], q: f64| {
                    if v.is_empty() {
                        f64::NAN
                    } else {
                        (percentile(v, q) * 1e4).round() / 10.0
                    }
                };
                println!(
                    "{}",
                    json!({"bench": "admission", "clients": clients, "connections": if connected { "kept" } else { "new" },
                           "max_queue_wait_ms": engine.max_queue_wait.as_millis() as u64,
                           "admitted": ok.len(), "refused_429": refused.len(), "admitted_per_s": (rps * 100.0).round() / 100.0,
                           "admitted_p50_ms": pct(&ok, 0.5), "admitted_p99_ms": pct(&ok, 0.99),
                           "refused_p50_ms": pct(&refused, 0.5), "refused_p99_ms": pct(&refused, 0.99),
                           "health_polls": health.len(), "health_p99_ms": pct(&health, 0.99),
                           "health_max_ms": pct(&health, 1.0),
                           "refused_p99_ms_server_side_at_most": server_429_p99_ms})
                );
                // Let the admitted work drain before the next burst.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            continue;
        }
        if batching {
            // The bare engine, one request at a time, for the server's overhead.
            let mut lat = Vec::new();
            load(&url, 1, 3, &smiles).await; // warm-up
            for i in 0..20 {
                let req = Request {
                    prompt: Prompt::Function {
                        name: "QED".into(),
                        domains: Default::default(),
                    },
                    inputs: vec![Input::Text(smiles[i % smiles.len()].clone())],
                    parameters: Default::default(),
                    stream: false,
                };
                let t = Instant::now();
                p.predict(req).await.unwrap();
                lat.push(t.elapsed().as_secs_f64());
            }
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let (_, http) = load(&url, 1, 20, &smiles).await;
            println!(
                "{}",
                json!({"bench": "server_overhead_c1", "engine_p50_ms": percentile(&lat, 0.5) * 1e3, "http_p50_ms": percentile(&http, 0.5) * 1e3, "overhead_ms": (percentile(&http, 0.5) - percentile(&lat, 0.5)) * 1e3})
            );
        }
        for clients in [1usize, 8, 32] {
            let per_client = match clients {
                1 => 20,
                8 => 8,
                _ => 4,
            };
            load(&url, clients.min(4), 1, &smiles).await; // warm-up
            let (rps, lat) = load(&url, clients, per_client, &smiles).await;
            println!(
                "{}",
                json!({"bench": "predict", "batching": batching, "clients": clients, "requests_per_s": (rps * 100.0).round() / 100.0, "p50_ms": (percentile(&lat, 0.5) * 1e4).round() / 10.0, "p99_ms": (percentile(&lat, 0.99) * 1e4).round() / 10.0, "requests": lat.len()})
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
