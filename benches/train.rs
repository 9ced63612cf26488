//! Seconds per training step on the default model, through tagllm's own trainer, at batch 8
//! with ~64-token inputs: stage 1 (a domain tag, next-token loss on the text after it),
//! stage 2 (a function tag + regression head after a frozen domain tag) and stage 3 (two
//! frozen domain tags, then the function tag). Stage 2 is also timed without prefix reuse
//! (forward + backward only) to show what reuse saves.
//!
//! Run: `cargo bench --bench train` (after scripts/setup-model.sh). One JSON line each.
//! `cargo bench --bench train -- stage2` runs only the measurements whose name contains
//! `stage2`; `TAGLLM_BENCH_BATCH` (default 8) and `TAGLLM_BENCH_TOKENS` (positions per
//! example, default 64) set the shape, so a real run's configuration can be matched
//! (`scripts/repro/step_time.py` does that to check the logs' seconds per step), and
//! `TAGLLM_BENCH_STEPS` (default 5) the steps per run (the steady time is the median of
//! those after the first two).

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use serde_json::json;
use tagllm::model::BaseModel;
use tagllm::tags::{TagBundle, TagKind, TagManifest, TagSet};
use tagllm::train::{
    mean_embedding_init, Dataset, HeadKind, Hyperparameters, Progress, TrainJob, Trainer,
};

const SMILES: &str = "CC(=O)Oc1ccccc1C(=O)OCCN(CC)CCOc1ccc(Cl)cc1C(=O)NCCCCOCC(F)(F)F";
const PROTEIN: &str = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ";

fn domain(m: &BaseModel, name: &str) -> Arc<TagBundle> {
    Arc::new(TagBundle {
        manifest: TagManifest {
            name: name.into(),
            kind: TagKind::Domain,
            version: 1,
            num_vectors: 10,
            hidden_size: m.config().hidden_size,
            base_model: m.fingerprint.clone(),
            head_positions: 1,
            head_hidden: 0,
            head: None,
            template: None,
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: json!({"synthetic": "benchmark"}),
            metrics: serde_json::Value::Null,
        },
        vectors: mean_embedding_init(m, 10).unwrap(),
        head: None,
        source: "bundle",
    })
}

/// A prefix of `s` that is `n` tokens long.
fn tokens(m: &BaseModel, s: &str, n: usize) -> String {
    let mut t: String = s.chars().cycle().take(s.len() * 3).collect();
    while m.tokenizer.encode_fragment(&t).unwrap().len() > n {
        t.pop();
    }
    t
}

fn data(records: Vec<serde_json::Value>) -> Dataset {
    Dataset::from_values(&records).unwrap()
}

/// The benchmark's shape: examples per step and positions per example.
#[derive(Clone, Copy)]
struct Shape {
    batch: usize,
    tokens: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a count, got {v:?}"))
        })
        .unwrap_or(default)
}

/// Seconds per step: (the second step, whose frozen prefixes are new; the mean of the
/// steps after the first epoch, whose prefixes come from the trainer's cache). The data
/// holds two batches, so steps 0-1 are the first epoch.
fn seconds_per_step(m: &BaseModel, frozen: Arc<TagSet>, job: TrainJob, d: &Dataset) -> (f64, f64) {
    let t = Trainer::new(m, frozen, job, d, None).unwrap();
    let mut stamps = Vec::new();
    t.run(None, &mut |_: &Progress| {
        stamps.push(Instant::now());
        true
    })
    .unwrap();
    // Steps 0-1 are the first epoch (step 0 also warms up). The median, not the mean:
    // this machine's step times have outliers (other load, the host's steal time).
    let mut steady: Vec<f64> = stamps[2..]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    steady.sort_by(f64::total_cmp);
    (
        (stamps[1] - stamps[0]).as_secs_f64(),
        steady[steady.len() / 2],
    )
}

fn main() {
    let path =
        std::env::var("TAGLLM_MODEL").unwrap_or_else(|_| tagllm::model::DEFAULT_MODEL_PATH.into());
    let m = BaseModel::load(std::path::Path::new(&path), &Device::Cpu)
        .expect("run scripts/setup-model.sh first");
    let shape = Shape {
        batch: env_usize("TAGLLM_BENCH_BATCH", 8).max(1),
        tokens: env_usize("TAGLLM_BENCH_TOKENS", 64).max(24),
    };
    let filter = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let wanted = |name: &str| name.contains(filter.as_str());
    let examples = 2 * shape.batch;
    let mut set = TagSet::default();
    set.tags.insert("SMILES".into(), domain(&m, "SMILES"));
    set.tags.insert("Protein".into(), domain(&m, "Protein"));
    let set = Arc::new(set);
    let h = Hyperparameters {
        steps: env_usize("TAGLLM_BENCH_STEPS", 5).max(4),
        batch_size: shape.batch,
        warmup_ratio: 0.0,
        ..Default::default()
    };
    let job = |stage, tag: &str, template: &str, head| TrainJob {
        stage,
        tags: vec![tag.into()],
        template: template.into(),
        target: (head != HeadKind::None).then(|| "y".into()),
        head,
        target_range: None,
        hyperparameters: h.clone(),
    };
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let report = |name: &str, secs: f64, tokens: usize| {
        println!(
            "{}",
            json!({"bench": name, "seconds_per_step": round(secs), "batch": shape.batch, "tokens_per_example": tokens})
        );
    };
    let report2 = |name: &str, (first, steady): (f64, f64), tokens: usize| {
        println!(
            "{}",
            json!({"bench": name, "seconds_per_step": round(steady), "first_epoch_seconds_per_step": round(first),
                   "batch": shape.batch, "tokens_per_example": tokens})
        );
    };

    // Stage 1: <SMILES> then text (10 tag positions + the text), LM loss on the text.
    if wanted("train_stage1") {
        let text = tokens(&m, SMILES, shape.tokens - 10);
        let d1 = data(
            (0..examples)
                .map(|i| json!({"text": text.chars().skip(i % 3).collect::<String>()}))
                .collect(),
        );
        report2(
            "train_stage1",
            seconds_per_step(
                &m,
                Arc::new(TagSet::default()),
                job(1, "SMILES", "<SMILES>{text}", HeadKind::None),
                &d1,
            ),
            shape.tokens,
        );
    }

    // Stage 2: the learned function tag at the end.
    let tpl2 = "# # Input: The SMILES of the molecule is <SMILES> {smiles}. \n# # Output: the quantitative estimate of druglikeness score is <QED>";
    let fixed2 = m
        .tokenizer
        .encode_fragment(
            &tpl2
                .replace("<SMILES>", "")
                .replace("<QED>", "")
                .replace("{smiles}", ""),
        )
        .unwrap()
        .len()
        + 20;
    let smiles = tokens(&m, SMILES, shape.tokens.saturating_sub(fixed2).max(4));
    let d2 = data(
        (0..examples)
            .map(|i| json!({"smiles": smiles.chars().skip(i % 3).collect::<String>(), "y": i as f64 / examples as f64}))
            .collect(),
    );
    if wanted("train_stage2") {
        report2(
            "train_stage2",
            seconds_per_step(
                &m,
                set.clone(),
                job(2, "QED", tpl2, HeadKind::Regression),
                &d2,
            ),
            shape.tokens,
        );
    }

    // Stage 2 forward + backward: the prefix from the cache (after a first call), and
    // everything differentiated.
    if wanted("stage2_fwd_bwd") {
        let t = Trainer::new(
            &m,
            set.clone(),
            job(2, "QED", tpl2, HeadKind::Regression),
            &d2,
            None,
        )
        .unwrap();
        let batch: Vec<usize> = (0..shape.batch).collect();
        for reuse in [true, false] {
            t.gradients(&batch, reuse).unwrap();
            let started = Instant::now();
            for _ in 0..3 {
                t.gradients(&batch, reuse).unwrap();
            }
            report(
                if reuse {
                    "stage2_fwd_bwd_cached_prefix"
                } else {
                    "stage2_fwd_bwd_all_differentiated"
                },
                started.elapsed().as_secs_f64() / 3.0,
                shape.tokens,
            );
        }
    }

    // Stage 3: protein + SMILES, two frozen domain tags, the function tag at the end.
    if wanted("train_stage3") {
        let tpl3 = "# # Input: The protein sequence is <Protein> {protein}. \nThe SMILES of the drug is <SMILES> {smiles}. \n# # Output: The binding affinity is <BA>";
        let fixed3 = m
            .tokenizer
            .encode_fragment(
                &tpl3
                    .replace("<Protein>", "")
                    .replace("<SMILES>", "")
                    .replace("<BA>", "")
                    .replace("{protein}", "")
                    .replace("{smiles}", ""),
            )
            .unwrap()
            .len()
            + 30;
        let half = shape.tokens.saturating_sub(fixed3) / 2;
        let (p, s) = (
            tokens(&m, PROTEIN, half.max(4)),
            tokens(&m, SMILES, half.max(4)),
        );
        let d3 = data(
            (0..examples)
                .map(|i| json!({"protein": p.chars().skip(i % 3).collect::<String>(), "smiles": s.clone(), "y": i as f64}))
                .collect(),
        );
        report2(
            "train_stage3",
            seconds_per_step(&m, set, job(3, "BA", tpl3, HeadKind::Regression), &d3),
            fixed3 + 2 * half.max(4),
        );
    }
}
