//! The default model (SmolLM2-135M-Instruct, GGUF Q4_1) held to fixtures computed by an
//! independent implementation (HF transformers, float32; see tests/reference/README.md).

mod common;

use candle_core::{Device, Tensor, D};
use common::{default_model, max_abs_diff, npy, reference_json};
use tagllm::model::{generate, GenerationParams, Mode};

const TOL: f32 = 1e-3;

#[test]
fn tokenizer_reproduces_every_reference_id_and_round_trips() {
    let m = default_model();
    let fixture = reference_json("tokens.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 45);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = m.tokenizer.encode(text).unwrap();
        assert_eq!(got, want, "ids of {text:?}");
        let tokens: Vec<String> = got
            .iter()
            .map(|&i| m.tokenizer.id_to_token(i).unwrap())
            .collect();
        let want_tokens: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(tokens, want_tokens, "token strings of {text:?}");
        let decoded = m.tokenizer.decode(&got, false).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(decoded, text, "round trip of {text:?}");
    }
}

#[test]
fn special_ids_and_no_bos() {
    let m = default_model();
    assert_eq!(m.tokenizer.encode("hello").unwrap(), vec![28120]);
    assert_eq!(m.tokenizer.bos_id(), Some(1));
    assert_eq!(m.tokenizer.eos_ids(), &[2]);
    // The catalogue states the EOS set the loaded model has.
    let eos: Vec<String> = (m.tokenizer.eos_ids().iter())
        .map(|&id| m.tokenizer.id_to_token(id).unwrap())
        .collect();
    let catalogue = tagllm::model::catalogue::catalogue();
    assert_eq!(
        eos,
        tagllm::model::catalogue::find(&catalogue.default)
            .unwrap()
            .eos
    );
    let fixture = reference_json("tokens.json");
    for (tok, id) in fixture["special_tokens"].as_object().unwrap() {
        assert_eq!(
            m.tokenizer.encode(tok).unwrap(),
            vec![id.as_u64().unwrap() as u32],
            "{tok}"
        );
    }
}

fn vals(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn row8(t: &Tensor, row: usize) -> Vec<f32> {
    t.get(row)
        .unwrap()
        .narrow(0, 0, 8)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn dequantized_weights_match_the_reference() {
    let m = default_model();
    let w = m.llama.weights();
    let c = m.config();
    let fx = reference_json("weights_check.json");
    assert!(close(
        &row8(&w.embed, 1),
        &vals(&fx["embed_tokens[1][:8]"]),
        1e-6
    ));
    assert!(close(
        &row8(&w.embed, 28120),
        &vals(&fx["embed_tokens[28120][:8]"]),
        1e-6
    ));
    let sum = w
        .embed
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want_sum = fx["embed_tokens_sum"].as_f64().unwrap();
    assert!(
        (sum - want_sum).abs() < 1e-3 * want_sum.abs().max(1.0),
        "embedding sum {sum} vs {want_sum}"
    );
    let l0 = &w.layers[0];
    assert!(close(
        &row8(&l0.o.weight().unwrap(), 0),
        &vals(&fx["layers.0.self_attn.o_proj[0][:8]"]),
        1e-6
    ));
    assert!(close(
        &row8(&l0.down.weight().unwrap(), 0),
        &vals(&fx["layers.0.mlp.down_proj[0][:8]"]),
        1e-6
    ));
    let attn_norm: Vec<f32> = l0.attn_norm.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
    assert!(close(
        &attn_norm,
        &vals(&fx["layers.0.input_layernorm[:8]"]),
        1e-7
    ));
    let norm: Vec<f32> = w.norm.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
    assert!(close(&norm, &vals(&fx["norm[:8]"]), 1e-7));
    let q = l0
        .qkv
        .weight()
        .unwrap()
        .narrow(0, 0, c.num_heads * c.head_dim)
        .unwrap();
    let q_sum = q
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (q_sum - fx["layers.0.self_attn.q_proj_sum"].as_f64().unwrap()).abs() < 1e-3,
        "q sum {q_sum}"
    );
}

fn hidden_of(ids: &[u32], mode: Mode) -> Tensor {
    let m = default_model();
    let emb = m.llama.embed_ids(ids).unwrap().unsqueeze(0).unwrap();
    m.llama
        .forward(&emb, None, None, mode)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn last_position_logits_and_hidden_states_match_the_reference() {
    let m = default_model();
    let fx = reference_json("logits.json");
    for case in fx["cases"].as_array().unwrap() {
        let k = case["k"].as_u64().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            m.tokenizer.encode(case["text"].as_str().unwrap()).unwrap(),
            ids
        );
        let hidden = hidden_of(&ids, Mode::Fast);
        let last = hidden.get(ids.len() - 1).unwrap();
        let logits = m
            .llama
            .logits(&last.unsqueeze(0).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let want = npy(&format!("logits_{k}.npy"));
        let diff = max_abs_diff(&logits, &want);
        assert!(diff < TOL, "case {k}: logits differ by {diff}");
        let argmax = logits
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert_eq!(
            argmax,
            want.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap(),
            "case {k} argmax"
        );
    }
    let ids: Vec<u32> = serde_json::from_value(fx["hidden"]["ids"].clone()).unwrap();
    let emb = m.llama.embed_ids(&ids).unwrap();
    assert!(max_abs_diff(&emb, &npy("hidden_0_embed.npy")) < 1e-6);
    for mode in [Mode::Fast, Mode::Differentiable] {
        let diff = max_abs_diff(&hidden_of(&ids, mode), &npy("hidden_0.npy"));
        assert!(
            diff < TOL,
            "{mode:?}: final-norm hidden states differ by {diff}"
        );
    }
}

/// `[embed(before) ; T ; embed(after)]`, the soft-prompt layouts of softprompt.json.
fn soft_prompt_input(layout: &serde_json::Value, tag: &Tensor) -> Tensor {
    let m = default_model();
    let parts: Vec<Tensor> = layout
        .as_array()
        .unwrap()
        .iter()
        .map(|part| match part["kind"].as_str().unwrap() {
            "tag" => tag.clone(),
            _ => {
                let ids: Vec<u32> = serde_json::from_value(part["ids"].clone()).unwrap();
                m.llama.embed_ids(&ids).unwrap()
            }
        })
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

#[test]
fn soft_prompts_as_prefix_and_in_the_middle_match_the_reference() {
    let m = default_model();
    let fx = reference_json("softprompt.json");
    let tag = npy("softprompt_T.npy");
    // The tag matrix is given by a formula: check we read the same one.
    let t: Vec<Vec<f32>> = tag.to_vec2().unwrap();
    assert!((t[3][100] - (0.02 * (0.37f64 * 3.0 + 0.011 * 100.0).sin()) as f32).abs() < 1e-7);
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = soft_prompt_input(&case["layout"], &tag)
            .unsqueeze(0)
            .unwrap();
        let want_hidden = npy(&format!("softprompt_{name}_hidden.npy"));
        let want_logits = npy(&format!("softprompt_{name}_logits_last.npy"));
        for mode in [Mode::Fast, Mode::Differentiable] {
            let hidden = m
                .llama
                .forward(&input, None, None, mode)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let diff = max_abs_diff(&hidden, &want_hidden);
            assert!(diff < TOL, "{name} {mode:?}: hidden differs by {diff}");
            let n = hidden.dim(0).unwrap();
            let logits = m
                .llama
                .logits(&hidden.narrow(0, n - 1, 1).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let diff = max_abs_diff(&logits, &want_logits);
            assert!(diff < TOL, "{name} {mode:?}: logits differ by {diff}");
        }
    }
}

#[test]
fn greedy_chat_generation_matches_the_reference() {
    let m = default_model();
    let fx = reference_json("generation.json");
    let prompt = m
        .tokenizer
        .apply_chat_template("What is the capital of France?")
        .unwrap();
    assert_eq!(prompt, fx["chat_template_prompt"].as_str().unwrap());
    let ids = m.tokenizer.encode(&prompt).unwrap();
    let want_prompt: Vec<u32> = serde_json::from_value(fx["prompt_ids"].clone()).unwrap();
    assert_eq!(ids, want_prompt);
    let params = GenerationParams {
        max_new_tokens: 24,
        ..Default::default()
    };
    let out = generate(m, &m.llama.embed_ids(&ids).unwrap(), &params).unwrap();
    let want: Vec<u32> = serde_json::from_value(fx["greedy_new_ids"].clone()).unwrap();
    assert_eq!(out.ids, want);
    // The reference decodes its EOS as `<|im_end|>`; generated text holds no special token.
    let want_text = fx["greedy_text"].as_str().unwrap();
    assert_eq!(out.text, want_text.trim_end_matches("<|im_end|>"));
    assert_ne!(out.text, want_text);
}

#[test]
fn a_padded_batch_equals_each_sequence_alone() {
    let m = default_model();
    let texts = ["The capital of France is", "CC(=O)Oc1ccccc1C(=O)O", "Hi"];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t).unwrap())
        .collect();
    let s = ids.iter().map(Vec::len).max().unwrap();
    let d = m.config().hidden_size;
    for left in [false, true] {
        let mut rows = Vec::new();
        let mut mask = Vec::new();
        for seq in &ids {
            let pad = s - seq.len();
            let emb = m.llama.embed_ids(seq).unwrap();
            let zeros = Tensor::zeros((pad, d), candle_core::DType::F32, &Device::Cpu).unwrap();
            let (row, mrow): (Tensor, Vec<u32>) = if left {
                (
                    Tensor::cat(&[&zeros, &emb], 0).unwrap(),
                    [vec![0; pad], vec![1; seq.len()]].concat(),
                )
            } else {
                (
                    Tensor::cat(&[&emb, &zeros], 0).unwrap(),
                    [vec![1; seq.len()], vec![0; pad]].concat(),
                )
            };
            rows.push(row);
            mask.extend(mrow);
        }
        let batch = Tensor::stack(&rows, 0).unwrap();
        let mask = Tensor::from_vec(mask, (ids.len(), s), &Device::Cpu).unwrap();
        let hidden = m
            .llama
            .forward(&batch, Some(&mask), None, Mode::Fast)
            .unwrap();
        for (i, seq) in ids.iter().enumerate() {
            let alone = hidden_of(seq, Mode::Fast);
            let start = if left { s - seq.len() } else { 0 };
            let got = hidden.get(i).unwrap().narrow(0, start, seq.len()).unwrap();
            let diff = max_abs_diff(&got, &alone);
            // Float noise only (different matmul blocking; values reach |60|); a masking
            // error would show up at order 1.
            assert!(
                diff < 5e-4,
                "left={left} seq {i}: batched differs from alone by {diff}"
            );
        }
    }
}

/// Serving at a quantized precision (`serve --precision q8_0`): decoding steps (one or two
/// rows) read q8_0 block matrices, everything else stays f32. Teacher-forced along the
/// reference's greedy answer, each step's logits stay close to f32's and keep its argmax,
/// and the greedy answer is the reference's; q4_0 (measured, not offered) drifts much
/// more. The drift is printed (docs/serving.md: serving precision).
#[test]
fn quantized_serving_drifts_little_from_the_reference() {
    use candle_core::quantized::GgmlDType;
    let m = default_model();
    let gen = reference_json("generation.json");
    let prompt: Vec<u32> = serde_json::from_value(gen["prompt_ids"].clone()).unwrap();
    let want: Vec<u32> = serde_json::from_value(gen["greedy_new_ids"].clone()).unwrap();
    // Per step: (final hidden state, logits) after the prompt, then after each reference
    // token, one row at a time.
    let step_logits = |llama: &tagllm::model::Llama| -> Vec<(Tensor, Tensor)> {
        let mut cache = llama.new_cache();
        let first = llama.embed_ids(&prompt).unwrap().unsqueeze(0).unwrap();
        let h = llama
            .forward(&first, None, Some(&mut cache), Mode::Fast)
            .unwrap();
        let n = h.dim(1).unwrap();
        let last = h.narrow(1, n - 1, 1).unwrap();
        let mut out = vec![(
            last.clone(),
            llama.logits(&last).unwrap().flatten_all().unwrap(),
        )];
        for &id in &want[..want.len() - 1] {
            let x = llama.embed_ids(&[id]).unwrap().unsqueeze(0).unwrap();
            let h = llama
                .forward(&x, None, Some(&mut cache), Mode::Fast)
                .unwrap();
            let logits = llama.logits(&h).unwrap().flatten_all().unwrap();
            out.push((h, logits));
        }
        out
    };
    let (_, exact): (Vec<Tensor>, Vec<Tensor>) = step_logits(&m.llama).into_iter().unzip();
    let top = |t: &Tensor| t.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
    for (name, dtype, tol) in [
        ("q8_0", GgmlDType::Q8_0, Q8_LOGITS_TOL),
        ("q4_0", GgmlDType::Q4_0, Q4_LOGITS_TOL),
    ] {
        let llama = m.llama.quantized(dtype).unwrap();
        let (hidden, got): (Vec<Tensor>, Vec<Tensor>) = step_logits(&llama).into_iter().unzip();
        let diff = got
            .iter()
            .zip(&exact)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        let argmax_same = got
            .iter()
            .zip(&exact)
            .filter(|(a, b)| top(a) == top(b))
            .count();
        // The best logits are recomputed in f32 on top of the quantized head: given the
        // same hidden state, the top logit is the f32 head's.
        let best = |t: &Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        let top_diff = got
            .iter()
            .zip(&hidden)
            .map(|(q, h)| {
                let f32_head = m.llama.logits(h).unwrap().flatten_all().unwrap();
                (best(q) - best(&f32_head)).abs()
            })
            .fold(0f32, f32::max);
        let served = tagllm::model::BaseModel { llama, ..m.clone() };
        let params = GenerationParams {
            max_new_tokens: 24,
            ..Default::default()
        };
        let out = generate(&served, &served.llama.embed_ids(&prompt).unwrap(), &params).unwrap();
        eprintln!(
            "{}",
            serde_json::json!({"precision": name, "decode_steps": exact.len(), "logits_max_abs_diff_vs_f32": diff,
                "argmax_same_as_f32": argmax_same, "top_logit_diff_vs_f32_head": top_diff, "greedy_same_as_reference": out.ids == want, "text": out.text})
        );
        assert!(
            diff < tol,
            "{name}: decoding logits differ from f32 by {diff}"
        );
        if dtype == GgmlDType::Q8_0 {
            assert!(
                top_diff < 1e-3,
                "the best logit is not f32's: off by {top_diff}"
            );
            assert_eq!(argmax_same, exact.len(), "q8_0 changed a decoding argmax");
            assert_eq!(
                out.ids, want,
                "q8_0 changed the greedy answer: {:?}",
                out.text
            );
        }
    }
}

// Measured over the 8 steps (the tail of the logits; the best 64 are exact): q8_0 1.09
// (every argmax kept; llama.cpp's own run of the Q4_1 file is within 0.6 of the reference
// at the prompt), q4_0 8.7 (one argmax lost).
const Q8_LOGITS_TOL: f32 = 2.0;
const Q4_LOGITS_TOL: f32 = 15.0;
