//! Every model family on the project's tiny seeded models: each family's GGUF layout and
//! its HF directory compute the same function, gradients through spliced vectors match
//! finite differences, and q8_0 decoding steps on host slices match the tensor forward.
//! (The real models of each family are checked against llama.cpp by
//! `scripts/llamacpp-check.sh`; `tiny_model.rs` holds the llama-only details.)

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor, Var};
use common::{max_abs_diff, tempdir};
use tagllm::model::tiny::{write_tiny_gguf_of, write_tiny_hf_of};
use tagllm::model::{BaseModel, Family, Mode, SlotKv};

const FAMILIES: [Family; 2] = [Family::Llama, Family::Qwen2];
const TEXT: &str = "the cat sat on 42 mats, then CCO ran";

fn tiny(dir: &std::path::Path, family: Family, ty: GgmlDType, seed: u64) -> BaseModel {
    let path = dir.join(format!("tiny-{}-{ty:?}-{seed}.gguf", family.name()));
    write_tiny_gguf_of(&path, family, ty, seed, true).unwrap();
    BaseModel::load(&path, &Device::Cpu).unwrap()
}

fn forward(m: &BaseModel, text: &str) -> Tensor {
    let x = m.embed_text(text).unwrap().unsqueeze(0).unwrap();
    m.llama.forward(&x, None, None, Mode::Fast).unwrap()
}

#[test]
fn each_familys_gguf_and_hf_directory_compute_the_same_function() {
    let dir = tempdir();
    for family in FAMILIES {
        let gguf = tiny(dir.path(), family, GgmlDType::F32, 7);
        let hf_dir = dir.path().join(format!("hf-{}", family.name()));
        write_tiny_hf_of(&hf_dir, family, 7, true).unwrap();
        let hf = BaseModel::load(&hf_dir, &Device::Cpu).unwrap();
        assert_eq!(gguf.config(), hf.config());
        assert_eq!(gguf.config().family, family);
        let (a, b) = (forward(&gguf, TEXT), forward(&hf, TEXT));
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-5, "{}: {diff}", family.name());
    }
}

/// qwen2's q/k/v biases are read and used: the same seed's weights without them (as
/// llama, whose GGUF layout the loader undoes) give another function.
#[test]
fn qwen2_biases_change_the_function() {
    let dir = tempdir();
    let llama = tiny(dir.path(), Family::Llama, GgmlDType::F32, 9);
    let qwen = tiny(dir.path(), Family::Qwen2, GgmlDType::F32, 9);
    assert!(qwen.llama.weights().layers[0].qkv_bias.is_some());
    assert!(llama.llama.weights().layers[0].qkv_bias.is_none());
    let diff = max_abs_diff(&forward(&llama, TEXT), &forward(&qwen, TEXT));
    assert!(diff > 1e-2, "biases changed nothing: {diff}");
}

fn loss_of(m: &BaseModel, tag: &Tensor, probe: &Tensor) -> Tensor {
    let before = m.embed_text("the ").unwrap();
    let after = m.embed_text("CCO then").unwrap();
    let x = Tensor::cat(&[&before, tag, &after], 0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = m
        .llama
        .forward(&x, None, None, Mode::Differentiable)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let n = h.dim(0).unwrap();
    (h.narrow(0, n - 3, 3).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn each_familys_gradient_wrt_spliced_vectors_matches_finite_differences() {
    let dir = tempdir();
    for family in FAMILIES {
        let m = tiny(dir.path(), family, GgmlDType::F32, 21);
        let d = m.config().hidden_size;
        let probe = Tensor::randn(0f32, 1.0, (3, d), &Device::Cpu).unwrap();
        let tag0 = (Tensor::randn(0f32, 1.0, (4, d), &Device::Cpu).unwrap() * 0.5).unwrap();
        let var = Var::from_tensor(&tag0).unwrap();
        let grads = loss_of(&m, var.as_tensor(), &probe).backward().unwrap();
        let grad = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let base = tag0.to_vec2::<f32>().unwrap();
        let eps = 1e-2f32;
        for (i, j) in [(0, 0), (0, 17), (1, 5), (2, 40), (3, 63), (3, 1)] {
            let shifted = |delta: f32| {
                let mut t = base.clone();
                t[i][j] += delta;
                let t = Tensor::new(t, &Device::Cpu).unwrap();
                loss_of(&m, &t, &probe).to_scalar::<f32>().unwrap()
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let g = grad[i][j];
            assert!(
                (fd - g).abs() <= 2e-2 * fd.abs().max(g.abs()).max(0.1),
                "{}: d loss / d tag[{i}][{j}]: backprop {g}, finite differences {fd}",
                family.name()
            );
        }
        // Every tag row influences later positions, so no row's gradient is zero.
        let norms: Vec<f32> = (grads.get(var.as_tensor()).unwrap().sqr().unwrap())
            .sum(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            norms.iter().all(|&n| n > 0.0),
            "{}: {norms:?}",
            family.name()
        );
    }
}

/// A q8_0 serving copy on CPU decodes its slot steps on host slices (`kv::host_step`,
/// biases added there too): each slot's final hidden state stays within f32 rounding of
/// the tensor forward's for that sequence alone (the same q8_0 matrices; sums in another
/// order, a polynomial `exp`), with slots of different lengths, for several steps.
#[test]
fn each_familys_q8_host_decoding_matches_the_tensor_forward() {
    let dir = tempdir();
    for family in FAMILIES {
        let m = tiny(dir.path(), family, GgmlDType::Q8_0, 23);
        let llama = m.llama.quantized(GgmlDType::Q8_0).unwrap();
        let prompts = ["the cat", "then a rat ran on the mat and sat", "CC", "a"];
        let mut kv = SlotKv::new(llama.config(), llama.device());
        let mut caches = Vec::new();
        for p in prompts {
            let mut cache = llama.new_cache();
            let x = m.embed_text(p).unwrap().unsqueeze(0).unwrap();
            llama
                .forward(&x, None, Some(&mut cache), Mode::Fast)
                .unwrap();
            kv.push(&cache).unwrap();
            caches.push(cache);
        }
        for step in 0..6u32 {
            let ids: Vec<u32> = (0..prompts.len() as u32)
                .map(|i| (37 * step + 11 * i + 5) % llama.config().vocab_size as u32)
                .collect();
            let x = llama.embed_ids(&ids).unwrap().unsqueeze(1).unwrap();
            let got = llama.decode_slots(&x, &mut kv).unwrap();
            for (i, cache) in caches.iter_mut().enumerate() {
                let xi = x.narrow(0, i, 1).unwrap();
                let want = llama.forward(&xi, None, Some(cache), Mode::Fast).unwrap();
                let scale = common::max_abs(&want);
                let diff = max_abs_diff(&got.narrow(0, i, 1).unwrap(), &want);
                assert!(
                    diff <= 1e-4 * scale,
                    "{} step {step}, slot {i}: off by {diff} (values up to {scale})",
                    family.name()
                );
            }
        }
    }
}

/// A q8_0 serving copy recomputes each row's best logits in f32, tied head or not (an
/// untied head, as Qwen2.5's GGUFs carry, keeps only its transposed f32 copy).
#[test]
fn q8_logits_are_rescored_exactly_with_tied_and_untied_heads() {
    let dir = tempdir();
    for (family, tie) in [(Family::Llama, true), (Family::Qwen2, false)] {
        let path = dir
            .path()
            .join(format!("head-{}-{tie}.gguf", family.name()));
        write_tiny_gguf_of(&path, family, GgmlDType::F32, 5, tie).unwrap();
        let m = BaseModel::load(&path, &Device::Cpu).unwrap();
        let q8 = m.llama.quantized(GgmlDType::Q8_0).unwrap();
        // Decoding-shaped hidden states: three sequences, one position each.
        let hidden = forward(&m, TEXT)
            .narrow(1, 0, 3)
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let logits = |llama: &tagllm::model::Llama| -> Vec<f32> {
            let l = llama.logits(&hidden).unwrap();
            l.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (exact, served) = (logits(&m.llama), logits(&q8));
        let vocab = m.config().vocab_size;
        for (row, (e, s)) in exact.chunks(vocab).zip(served.chunks(vocab)).enumerate() {
            let best = (0..vocab).max_by(|&a, &b| e[a].total_cmp(&e[b])).unwrap();
            // f32's up to the order of its sums; q8_0 alone moves logits by ~1e-2.
            let diff = (e[best] - s[best]).abs();
            assert!(
                diff <= 1e-5 * e[best].abs().max(1.0),
                "{} row {row}: the best logit {} is not f32's {}",
                family.name(),
                s[best],
                e[best]
            );
        }
    }
}
