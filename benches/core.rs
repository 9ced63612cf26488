//! Model-core benchmarks on the default model (CPU, f32):
//! - prefill of 64-token sequences at batch 1, 8 and 32, keeping only the last final-norm
//!   hidden state (what a regression/classification tag needs);
//! - greedy decoding tokens/s at batch 1 with the KV cache, with f32 weights and with
//!   the matrices re-quantized to q8_0 (`serve --precision`) and q4_0 (measured, not
//!   offered: it drifts too far); prefill at batch 32 for the quantized ones;
//! - generations decoded together as the server does (`DecodeBatch`: batched prefill,
//!   then one forward per token over the slot cache) at 1 and 16 sequences, f32 and q8_0;
//! - one training step at batch 8 x 64 tokens: forward + backward with respect to 10
//!   spliced tag vectors + AdamW, for a regression head and for prompt tuning (LM loss).
//!
//! Run: `cargo bench --bench core` (after scripts/setup-model.sh). Prints one JSON line
//! per measurement. `cargo bench --bench core -- decode_batch` runs one section;
//! `TAGLLM_BENCH_SEQUENCES=1,16` picks the decoding batch sizes, `TAGLLM_BENCH_PRECISIONS=q8_0`
//! the precisions.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use tagllm::model::{rows_at, BaseModel, DecodeBatch, Decoder, GenerationParams, Mode};

const SEQ: usize = 64;
const TAG_LEN: usize = 10;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

fn timed<F: FnMut()>(warmup: usize, runs: usize, mut f: F) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// `batch` rows of SEQ real tokens each (a repeated English/SMILES text).
fn token_batch(m: &BaseModel, batch: usize) -> Tensor {
    let ids = m
        .tokenizer
        .encode(&"The SMILES CC(=O)Oc1ccccc1C(=O)O is aspirin, a drug. ".repeat(8))
        .unwrap();
    let rows: Vec<Tensor> = (0..batch)
        .map(|b| m.llama.embed_ids(&ids[b % 5..b % 5 + SEQ]).unwrap())
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

fn main() {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let path =
        std::env::var("TAGLLM_MODEL").unwrap_or_else(|_| tagllm::model::DEFAULT_MODEL_PATH.into());
    let m = BaseModel::load(std::path::Path::new(&path), &Device::Cpu)
        .expect("run scripts/setup-model.sh first");
    let filter = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let report = |name: &str, value: f64, unit: &str, extra: serde_json::Value| {
        println!(
            "{}",
            serde_json::json!({"bench": name, "value": (value * 100.0).round() / 100.0, "unit": unit, "threads": threads, "detail": extra})
        );
    };

    if "prefill".contains(filter.as_str()) || filter.is_empty() {
        for batch in [1usize, 8, 32] {
            let x = token_batch(&m, batch);
            let last = vec![SEQ - 1; batch];
            let secs = timed(1, if batch == 32 { 3 } else { 5 }, || {
                let h = m.llama.forward(&x, None, None, Mode::Fast).unwrap();
                rows_at(&h, &last).unwrap();
            });
            report(
                &format!("prefill_b{batch}"),
                (batch * SEQ) as f64 / secs,
                "tokens/s",
                serde_json::json!({"seconds": secs}),
            );
        }
    }

    // Serving may read the matrices re-quantized (`serve --precision`): the same
    // measurements for each precision.
    let precisions = [
        ("f32", m.llama.clone()),
        ("q8_0", m.llama.quantized(GgmlDType::Q8_0).unwrap()),
        ("q4_0", m.llama.quantized(GgmlDType::Q4_0).unwrap()),
    ];
    // TAGLLM_BENCH_PRECISIONS=q8_0 measures just that one (e.g. under a profiler).
    let wanted = |precision: &str| {
        std::env::var("TAGLLM_BENCH_PRECISIONS")
            .map_or(true, |list| list.split(',').any(|p| p.trim() == precision))
    };

    if "prefill_quantized".contains(filter.as_str()) || filter.is_empty() {
        let x = token_batch(&m, 32);
        let last = vec![SEQ - 1; 32];
        for (precision, llama) in precisions[1..].iter().filter(|(p, _)| wanted(p)) {
            let secs = timed(1, 3, || {
                let h = llama.forward(&x, None, None, Mode::Fast).unwrap();
                rows_at(&h, &last).unwrap();
            });
            report(
                &format!("prefill_b32_{precision}"),
                (32 * SEQ) as f64 / secs,
                "tokens/s",
                serde_json::json!({"seconds": secs}),
            );
        }
    }

    if "decode".contains(filter.as_str()) || filter.is_empty() {
        let prompt = m
            .embed_text("The capital of France is")
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let steps = 64;
        for (precision, llama) in precisions.iter().filter(|(p, _)| wanted(p)) {
            let mut ids = Vec::new();
            let secs = timed(1, 3, || {
                ids.clear();
                let mut cache = llama.new_cache();
                let mut input = prompt.clone();
                for _ in 0..steps {
                    let h = llama
                        .forward(&input, None, Some(&mut cache), Mode::Fast)
                        .unwrap();
                    let n = h.dim(1).unwrap();
                    let logits = llama.logits(&h.narrow(1, n - 1, 1).unwrap()).unwrap();
                    let next = logits
                        .flatten_all()
                        .unwrap()
                        .argmax(D::Minus1)
                        .unwrap()
                        .to_scalar::<u32>()
                        .unwrap();
                    ids.push(next);
                    input = llama.embed_ids(&[next]).unwrap().unsqueeze(0).unwrap();
                }
            });
            let name = if *precision == "f32" {
                "decode_b1".to_string()
            } else {
                format!("decode_b1_{precision}")
            };
            report(
                &name,
                steps as f64 / secs,
                "tokens/s",
                serde_json::json!({"new_tokens": steps, "seconds": secs, "text": m.tokenizer.decode(&ids, true).unwrap_or_default()}),
            );
        }
    }

    // What the server runs: generations joined into a DecodeBatch (batched prefill, then
    // one forward per token for all of them over the persistent slot cache).
    if "decode_batch".contains(filter.as_str()) || filter.is_empty() {
        let steps = 64;
        // TAGLLM_BENCH_SEQUENCES=1,16 measures just those batch sizes.
        let sequences: Vec<usize> = std::env::var("TAGLLM_BENCH_SEQUENCES")
            .unwrap_or_else(|_| "1,2,4,8,16".into())
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("TAGLLM_BENCH_SEQUENCES: counts, comma-separated")
            })
            .collect();
        for (precision, llama) in precisions[..2].iter().filter(|(p, _)| wanted(p)) {
            let served = BaseModel {
                llama: llama.clone(),
                ..m.clone()
            };
            for &batch in &sequences {
                let params = GenerationParams {
                    max_new_tokens: steps + 1,
                    ..Default::default()
                };
                let prompts: Vec<Tensor> = (0..batch)
                    .map(|i| {
                        let chat = served
                            .tokenizer
                            .apply_chat_template(&format!(
                                "Tell a long story about molecule number {i}."
                            ))
                            .unwrap();
                        served.embed_text(&chat).unwrap()
                    })
                    .collect();
                let (mut tokens, mut decode_secs) = (0, 0.0);
                let secs = timed(1, 3, || {
                    let mut b = DecodeBatch::new(&served);
                    let joining = prompts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (i as u64, Decoder::new(&served, p, &params).unwrap()))
                        .collect();
                    for (_, r) in b.join(&served, joining, 4096) {
                        r.unwrap(); // Some: ended at its first token (EOS), not decoding
                    }
                    tokens = 0;
                    let t = Instant::now();
                    while !b.is_empty() {
                        for (h, finished) in b.step(&served).unwrap() {
                            tokens += 1;
                            if finished {
                                b.leave(h).unwrap();
                            }
                        }
                    }
                    decode_secs = t.elapsed().as_secs_f64();
                });
                report(
                    &format!("decode_batch_b{batch}_{precision}"),
                    tokens as f64 / decode_secs,
                    "tokens/s",
                    serde_json::json!({"sequences": batch, "tokens": tokens, "decode_seconds": decode_secs, "seconds_with_prefill": secs}),
                );
            }
        }
    }

    if "train".contains(filter.as_str()) || filter.is_empty() {
        let d = m.config().hidden_size;
        let batch = 8;
        let x = token_batch(&m, batch);
        let text = x.narrow(1, 0, SEQ - TAG_LEN).unwrap();
        let tag = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (TAG_LEN, d), &Device::Cpu).unwrap() * 0.05).unwrap(),
        )
        .unwrap();
        let head = Var::zeros((d, 1), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::randn(0f32, 1.0, (batch, 1), &Device::Cpu).unwrap();
        let params = ParamsAdamW {
            lr: 1e-4,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![tag.clone(), head.clone()], params.clone()).unwrap();
        // Regression: text then the function tag; the head reads the tag's last position.
        let secs = timed(1, 3, || {
            let t = tag
                .as_tensor()
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((batch, TAG_LEN, d))
                .unwrap();
            let input = Tensor::cat(&[&text, &t], 1).unwrap();
            let h = m
                .llama
                .forward(&input, None, None, Mode::Differentiable)
                .unwrap();
            let pred = rows_at(&h, &vec![SEQ - 1; batch])
                .unwrap()
                .matmul(head.as_tensor())
                .unwrap();
            let loss = (pred - &targets)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
        });
        report(
            "train_step_regression_b8x64",
            secs,
            "seconds",
            serde_json::json!({"tag_vectors": TAG_LEN}),
        );

        // Prompt tuning: the tag first, then LM cross-entropy on every text position.
        let ids = m
            .tokenizer
            .encode(&"The SMILES CC(=O)Oc1ccccc1C(=O)O is aspirin, a drug. ".repeat(8))
            .unwrap();
        let targets: Vec<u32> = (0..batch)
            .flat_map(|b| ids[b % 5 + 1..b % 5 + 1 + SEQ - TAG_LEN].to_vec())
            .collect();
        let targets = Tensor::from_vec(targets, batch * (SEQ - TAG_LEN), &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![tag.clone()], params).unwrap();
        let secs = timed(1, 3, || {
            let t = tag
                .as_tensor()
                .unsqueeze(0)
                .unwrap()
                .broadcast_as((batch, TAG_LEN, d))
                .unwrap();
            let input = Tensor::cat(&[&t, &text], 1).unwrap();
            let h = m
                .llama
                .forward(&input, None, None, Mode::Differentiable)
                .unwrap();
            let h = h
                .narrow(1, TAG_LEN, SEQ - TAG_LEN)
                .unwrap()
                .reshape((batch * (SEQ - TAG_LEN), d))
                .unwrap();
            let logits = m.llama.logits(&h).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
            opt.backward_step(&loss).unwrap();
        });
        report(
            "train_step_prompt_tuning_b8x64",
            secs,
            "seconds",
            serde_json::json!({"tag_vectors": TAG_LEN}),
        );
    }
}
