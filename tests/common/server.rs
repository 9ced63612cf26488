//! An in-process tagllm server on a real loopback socket, for HTTP tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use tagllm::http::{new_state, AppState, ServerConfig};
use tagllm::infer::{EngineConfig, Limits, Predictor};
use tagllm::service::{Service, ServiceConfig};
use tagllm::tags::{Head, HeadSpec, TagBundle, TagKind, TagManifest};

pub struct TestServer {
    pub url: String,
    pub state: Arc<AppState>,
    pub tags_dir: PathBuf,
    pub data_root: PathBuf,
    pub database_url: String,
    pub model_path: PathBuf,
    /// Sent (or dropped with the server): the service shuts down and stops its worker.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub _dir: tempfile::TempDir,
}

/// A fresh job store: SQLite in `dir`, or, when `TAGLLM_TEST_DATABASE_URL` names a
/// Postgres server, a new database of its own there (tests run in parallel and must not
/// see each other's jobs).
pub async fn fresh_database_url(dir: &Path) -> String {
    match std::env::var("TAGLLM_TEST_DATABASE_URL") {
        Ok(base) if base.starts_with("postgres://") => {
            use sqlx::Connection;
            sqlx::any::install_default_drivers();
            let name = format!("tagllm_test_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::AnyConnection::connect(&base)
                .await
                .expect("connecting to the test Postgres");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            let (prefix, _) = base.rsplit_once('/').expect("postgres URL with a database");
            format!("{prefix}/{name}")
        }
        Ok(other) => panic!("TAGLLM_TEST_DATABASE_URL must be a postgres:// URL, not {other:?}"),
        Err(_) => format!("sqlite://{}", dir.join("jobs.db").display()),
    }
}

impl TestServer {
    /// Shuts the service down as SIGTERM does and waits until it has stopped.
    pub async fn shut_down(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.serving.take() {
            h.await.unwrap().unwrap();
        }
    }

    pub fn predictor(&self) -> &Arc<Predictor> {
        self.state.predictor.get().unwrap()
    }
    pub fn fingerprint(&self) -> String {
        self.predictor().model.fingerprint.clone()
    }
}

pub fn write_tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    tagllm::model::tiny::write_tiny_gguf(&path, GgmlDType::Q8_0, 42, true).unwrap();
    path
}

pub struct Options {
    pub model: Option<PathBuf>,
    pub config: ServerConfig,
    pub limits: Limits,
    pub engine: EngineConfig,
    pub load: bool,
    /// Run an embedded training worker.
    pub worker: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: None,
            config: ServerConfig {
                max_concurrent_requests: 64,
                max_body_bytes: 1 << 20,
                max_dataset_bytes: 1 << 20,
                ..Default::default()
            },
            limits: Limits::default(),
            // Tests fire bursts on purpose: a queue budget no test reaches, unless it
            // tests admission itself. f32 decoding, so that answers equal the model's own
            // `generate` exactly (q8_0's drift is measured in reference_model.rs).
            engine: EngineConfig {
                precision: tagllm::model::Precision::F32,
                max_queue_wait: std::time::Duration::from_secs(600),
                max_first_token_wait: std::time::Duration::from_secs(600),
                ..Default::default()
            },
            load: true,
            worker: true,
        }
    }
}

pub fn test_worker_config() -> tagllm::jobs::WorkerConfig {
    tagllm::jobs::WorkerConfig {
        id: format!("test-worker-{}", uuid::Uuid::new_v4().simple()),
        lease: std::time::Duration::from_secs(3),
        poll: std::time::Duration::from_millis(50),
        heartbeat: std::time::Duration::from_millis(200),
        checkpoint_every: 2,
    }
}

pub async fn start(opts: Options) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let tags_dir = dir.path().join("tags");
    let data_root = dir.path().join("data");
    std::fs::create_dir_all(&tags_dir).unwrap();
    std::fs::create_dir_all(&data_root).unwrap();
    let model = opts
        .model
        .clone()
        .unwrap_or_else(|| write_tiny_model(dir.path()));
    let mut config = opts.config;
    config.data_root = Some(data_root.clone());
    let database_url = fresh_database_url(dir.path()).await;
    let listener = tagllm::http::listen("127.0.0.1", 0).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let (state, serving) = if opts.load {
        // The real assembly, as `tagllm serve` runs it.
        let mut service = Service::start(ServiceConfig {
            server: config,
            model_path: model.clone(),
            device: Device::Cpu,
            tags_dir: tags_dir.clone(),
            watch: true,
            limits: opts.limits,
            engine: opts.engine,
            database_url: database_url.clone(),
            worker: opts.worker.then(test_worker_config),
        })
        .await
        .unwrap();
        service.loaded().await.unwrap();
        let state = service.state.clone();
        (state, tokio::spawn(service.serve_until(listener, stop)))
    } else {
        // A server whose model never loads: the state alone, with its job store.
        let state = new_state(config).unwrap();
        let _ = state.jobs.set(
            tagllm::jobs::JobStore::connect(&database_url)
                .await
                .unwrap(),
        );
        let serving = tokio::spawn(tagllm::http::serve_until(listener, state.clone(), stop));
        (state, serving)
    };
    TestServer {
        url,
        state,
        tags_dir,
        data_root,
        database_url,
        model_path: model,
        stop: Some(stop_tx),
        serving: Some(serving),
        _dir: dir,
    }
}

/// A seeded tag bundle for the served model.
pub struct TagSpec<'a> {
    pub name: &'a str,
    pub kind: TagKind,
    pub version: u64,
    pub num_vectors: usize,
    pub head: Option<HeadSpec>,
    /// How many of the tag's last positions its head reads.
    pub head_positions: usize,
    /// Tanh units of the head's hidden layer (0: a linear head).
    pub head_hidden: usize,
    pub template: Option<&'a str>,
    pub seed: f64,
}

impl<'a> TagSpec<'a> {
    pub fn domain(name: &'a str) -> Self {
        Self {
            name,
            kind: TagKind::Domain,
            version: 1,
            num_vectors: 3,
            head: None,
            head_positions: 1,
            head_hidden: 0,
            template: None,
            seed: 1.0,
        }
    }
    pub fn regression(name: &'a str, template: &'a str) -> Self {
        Self {
            name,
            kind: TagKind::Function,
            version: 1,
            num_vectors: 4,
            head: Some(HeadSpec::Regression {
                target_mean: 10.0,
                target_std: 2.0,
                range: None,
            }),
            head_positions: 1,
            head_hidden: 0,
            template: Some(template),
            seed: 2.0,
        }
    }
}

/// Deterministic vectors: `sin(seed * (i + 1) + 0.1 j)`, scaled like token embeddings.
fn seeded(rows: usize, cols: usize, seed: f64) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|k| ((seed * (k / cols + 1) as f64 + 0.1 * (k % cols) as f64).sin() * 0.5) as f32)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

pub fn bundle(spec: &TagSpec, fingerprint: &str, d: usize) -> TagBundle {
    let head = spec.head.as_ref().map(|h| {
        let k = match h {
            HeadSpec::Regression { .. } => 1,
            HeadSpec::Classification { labels } => labels.len(),
        };
        let inputs = spec.head_positions * d;
        let hidden = (spec.head_hidden > 0).then(|| {
            (
                (seeded(spec.head_hidden, inputs, spec.seed + 0.7) * 0.3).unwrap(),
                seeded(1, spec.head_hidden, spec.seed + 0.9)
                    .flatten_all()
                    .unwrap(),
            )
        });
        let width = if spec.head_hidden > 0 {
            spec.head_hidden
        } else {
            inputs
        };
        Head {
            spec: h.clone(),
            positions: spec.head_positions,
            hidden,
            weight: seeded(k, width, spec.seed + 0.5),
            bias: Tensor::zeros(k, DType::F32, &Device::Cpu).unwrap(),
        }
    });
    TagBundle {
        manifest: TagManifest {
            name: spec.name.into(),
            kind: spec.kind,
            version: spec.version,
            num_vectors: spec.num_vectors,
            hidden_size: d,
            base_model: fingerprint.into(),
            head_positions: spec.head_positions,
            head_hidden: spec.head_hidden,
            head: spec.head.clone(),
            template: spec.template.map(String::from),
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: serde_json::json!({"made_by": "tests"}),
            metrics: serde_json::Value::Null,
        },
        vectors: seeded(spec.num_vectors, d, spec.seed),
        head,
        source: "bundle",
    }
}

/// Writes a bundle into the server's tags dir and waits until the server serves that version.
pub async fn install(server: &TestServer, spec: &TagSpec<'_>) {
    let d = server.predictor().model.config().hidden_size;
    bundle(spec, &server.fingerprint(), d)
        .save(&server.tags_dir)
        .unwrap();
    wait_for(server, |set| {
        set.get(spec.name)
            .is_some_and(|b| b.version() == spec.version)
    })
    .await;
}

/// Polls the registry until `cond` holds (the watcher applies changes within a second).
pub async fn wait_for(server: &TestServer, cond: impl Fn(&tagllm::tags::TagSet) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond(&server.predictor().registry.snapshot()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the registry never reached the expected state"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
