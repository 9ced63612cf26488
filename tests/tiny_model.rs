//! The project's tiny seeded model: both loaders, both forward modes, the KV cache,
//! padding, and the errors a bad model file gets.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, tempdir};
use tagllm::model::tiny::{write_tiny_gguf, write_tiny_hf};
use tagllm::model::{generate, BaseModel, GenerationParams, Mode};

fn tiny_gguf(dir: &std::path::Path, ty: GgmlDType, seed: u64) -> BaseModel {
    let path = dir.join(format!("tiny-{ty:?}-{seed}.gguf"));
    write_tiny_gguf(&path, ty, seed, true).unwrap();
    BaseModel::load(&path, &Device::Cpu).unwrap()
}

fn input(m: &BaseModel, text: &str) -> Tensor {
    m.embed_text(text).unwrap().unsqueeze(0).unwrap()
}

const TEXT: &str = "the cat sat on 42 mats, then CCO ran";

#[test]
fn gguf_f32_and_hf_directory_compute_the_same_function() {
    let dir = tempdir();
    let gguf = tiny_gguf(dir.path(), GgmlDType::F32, 7);
    let hf_dir = dir.path().join("hf");
    write_tiny_hf(&hf_dir, 7, true).unwrap();
    let hf = BaseModel::load(&hf_dir, &Device::Cpu).unwrap();
    assert_eq!(gguf.config(), hf.config());
    assert_eq!(
        gguf.tokenizer.encode(TEXT).unwrap(),
        hf.tokenizer.encode(TEXT).unwrap()
    );
    // GGUF q/k rows are permuted for llama.cpp; the loader must undo exactly that.
    let a = gguf
        .llama
        .forward(&input(&gguf, TEXT), None, None, Mode::Fast)
        .unwrap();
    let b = hf
        .llama
        .forward(&input(&hf, TEXT), None, None, Mode::Fast)
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5, "{}", max_abs_diff(&a, &b));
}

#[test]
fn quantized_variants_load_and_stay_close_to_f32() {
    let dir = tempdir();
    let reference = tiny_gguf(dir.path(), GgmlDType::F32, 3);
    let want = reference
        .llama
        .forward(&input(&reference, TEXT), None, None, Mode::Fast)
        .unwrap();
    // Cosine similarity to the f32 hidden states: quantization noise grows as bits shrink.
    for (ty, min_cos) in [
        (GgmlDType::F16, 0.9999),
        (GgmlDType::Q8_0, 0.999),
        (GgmlDType::Q4_1, 0.97),
        (GgmlDType::Q4_0, 0.97),
    ] {
        let m = tiny_gguf(dir.path(), ty, 3);
        let got = m
            .llama
            .forward(&input(&m, TEXT), None, None, Mode::Fast)
            .unwrap();
        let cos = cosine(&got, &want);
        assert!(cos > min_cos, "{ty:?}: cosine {cos}");
        assert_ne!(
            m.fingerprint, reference.fingerprint,
            "{ty:?} weights must fingerprint differently"
        );
    }
}

fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
    let dot = (&a * &b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    dot / (norm(&a) * norm(&b))
}

#[test]
fn fingerprint_is_stable_and_tells_weights_apart() {
    let dir = tempdir();
    let a = tiny_gguf(dir.path(), GgmlDType::Q8_0, 1);
    let a2 = BaseModel::load(&dir.path().join("tiny-Q8_0-1.gguf"), &Device::Cpu).unwrap();
    let b = tiny_gguf(dir.path(), GgmlDType::Q8_0, 2);
    assert_eq!(a.fingerprint, a2.fingerprint);
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_eq!(a.fingerprint.len(), 64);
}

#[test]
fn untied_lm_head_is_used() {
    let dir = tempdir();
    write_tiny_hf(dir.path(), 5, false).unwrap();
    let m = BaseModel::load(dir.path(), &Device::Cpu).unwrap();
    assert!(!m.config().tie_word_embeddings);
    let h = m
        .llama
        .forward(&input(&m, TEXT), None, None, Mode::Fast)
        .unwrap();
    let logits = m.llama.logits(&h).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let manual = h
        .broadcast_matmul(&st["lm_head.weight"].t().unwrap())
        .unwrap();
    assert!(max_abs_diff(&logits, &manual) < 1e-5);
    let tied = h
        .broadcast_matmul(&st["model.embed_tokens.weight"].t().unwrap())
        .unwrap();
    assert!(max_abs_diff(&logits, &tied) > 1e-2);
}

#[test]
fn fast_and_differentiable_modes_agree() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q4_1, 11);
    let x = input(&m, TEXT);
    let fast = m.llama.forward(&x, None, None, Mode::Fast).unwrap();
    let slow = m
        .llama
        .forward(&x, None, None, Mode::Differentiable)
        .unwrap();
    assert!(
        max_abs_diff(&fast, &slow) < 1e-4,
        "{}",
        max_abs_diff(&fast, &slow)
    );
}

#[test]
fn kv_cache_continuation_equals_one_full_pass_in_both_modes() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 12);
    let x = input(&m, TEXT);
    let n = x.dim(1).unwrap();
    for mode in [Mode::Fast, Mode::Differentiable] {
        let full = m.llama.forward(&x, None, None, mode).unwrap();
        let mut cache = m.llama.new_cache();
        let a = m
            .llama
            .forward(&x.narrow(1, 0, 5).unwrap(), None, Some(&mut cache), mode)
            .unwrap();
        let b = m
            .llama
            .forward(
                &x.narrow(1, 5, n - 6).unwrap(),
                None,
                Some(&mut cache),
                mode,
            )
            .unwrap();
        let c = m
            .llama
            .forward(
                &x.narrow(1, n - 1, 1).unwrap(),
                None,
                Some(&mut cache),
                mode,
            )
            .unwrap();
        assert_eq!(cache.len(), n);
        let pieces = Tensor::cat(&[a, b, c], 1).unwrap();
        assert!(max_abs_diff(&pieces, &full) < 1e-4, "{mode:?}");
    }
}

#[test]
fn padded_batches_equal_each_sequence_alone_with_and_without_cache() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 13);
    let d = m.config().hidden_size;
    let a = m.embed_text("the answer is 42").unwrap();
    let b = m.embed_text("CC").unwrap();
    let (la, lb) = (a.dim(0).unwrap(), b.dim(0).unwrap());
    let pad = Tensor::ones((la - lb, d), DType::F32, &Device::Cpu).unwrap(); // junk, masked out
                                                                             // Left padding, as a generation batch uses it.
    let batch = Tensor::stack(&[a.clone(), Tensor::cat(&[&pad, &b], 0).unwrap()], 0).unwrap();
    let mut mask = vec![1u32; 2 * la];
    mask[la..la + (la - lb)].iter_mut().for_each(|v| *v = 0);
    let mask = Tensor::from_vec(mask, (2, la), &Device::Cpu).unwrap();
    for mode in [Mode::Fast, Mode::Differentiable] {
        let mut cache = m.llama.new_cache();
        let h = m
            .llama
            .forward(&batch, Some(&mask), Some(&mut cache), mode)
            .unwrap();
        let alone_a = m
            .llama
            .forward(&a.unsqueeze(0).unwrap(), None, None, mode)
            .unwrap();
        let alone_b = m
            .llama
            .forward(&b.unsqueeze(0).unwrap(), None, None, mode)
            .unwrap();
        assert!(max_abs_diff(&h.get(0).unwrap(), &alone_a.squeeze(0).unwrap()) < 1e-4);
        let hb = h.get(1).unwrap().narrow(0, la - lb, lb).unwrap();
        assert!(max_abs_diff(&hb, &alone_b.squeeze(0).unwrap()) < 1e-4);
        // One decoding step for both: each continues its own sequence.
        let next = m.llama.embed_ids(&[5, 9]).unwrap().unsqueeze(1).unwrap();
        let step = m
            .llama
            .forward(&next, None, Some(&mut cache), mode)
            .unwrap();
        let cont_b = Tensor::cat(&[&b, &m.llama.embed_ids(&[9]).unwrap()], 0)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want_b = m
            .llama
            .forward(&cont_b, None, None, mode)
            .unwrap()
            .get(0)
            .unwrap()
            .get(lb)
            .unwrap();
        assert!(
            max_abs_diff(&step.get(1).unwrap().get(0).unwrap(), &want_b) < 1e-4,
            "{mode:?}"
        );
    }
}

// Gradients through spliced vectors, for every family: tests/families.rs.

#[test]
fn generation_is_greedy_by_default_and_seeded_when_sampling() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 31);
    let prompt = m.embed_text("the cat").unwrap();
    let greedy = GenerationParams {
        max_new_tokens: 6,
        ..Default::default()
    };
    let g1 = generate(&m, &prompt, &greedy).unwrap();
    let g2 = generate(&m, &prompt, &greedy).unwrap();
    assert_eq!(g1.ids, g2.ids);
    assert!(g1.ids.len() <= 6);
    // Greedy's first token is the argmax of the full forward's last logits.
    let h = m
        .llama
        .forward(&prompt.unsqueeze(0).unwrap(), None, None, Mode::Fast)
        .unwrap();
    let n = h.dim(1).unwrap();
    let logits = m
        .llama
        .logits(&h.get(0).unwrap().get(n - 1).unwrap().unsqueeze(0).unwrap())
        .unwrap();
    assert_eq!(
        g1.ids[0],
        logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    );
    let sample = |seed| GenerationParams {
        max_new_tokens: 6,
        temperature: Some(1.5),
        seed,
        ..Default::default()
    };
    assert_eq!(
        generate(&m, &prompt, &sample(1)).unwrap().ids,
        generate(&m, &prompt, &sample(1)).unwrap().ids
    );
    let outs: Vec<Vec<u32>> = (0..4)
        .map(|s| generate(&m, &prompt, &sample(s)).unwrap().ids)
        .collect();
    assert!(
        outs.iter().any(|o| o != &outs[0]),
        "different seeds should sample differently: {outs:?}"
    );
}

#[test]
fn chat_template_renders_chatml() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 0);
    let p = m.tokenizer.apply_chat_template("hi").unwrap();
    assert_eq!(p, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(m.tokenizer.encode(&p).unwrap()[0], 1);
}

fn load_err(path: &std::path::Path) -> String {
    format!("{:#}", BaseModel::load(path, &Device::Cpu).unwrap_err())
}

#[test]
fn bad_model_files_get_clear_errors() {
    let dir = tempdir();
    let missing = load_err(&dir.path().join("nope.gguf"));
    assert!(missing.contains("does not exist"), "{missing}");

    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, GgmlDType::Q4_1, 0, true).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let truncated = load_err(&cut);
    assert!(truncated.contains("truncated"), "{truncated}");
    let header_only = dir.path().join("header.gguf");
    std::fs::write(&header_only, &bytes[..64]).unwrap();
    let e = load_err(&header_only);
    assert!(e.contains("GGUF"), "{e}");

    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let e = load_err(&junk);
    assert!(
        e.contains("neither a GGUF file nor an HF model directory"),
        "{e}"
    );

    let hf = dir.path().join("hf");
    write_tiny_hf(&hf, 0, true).unwrap();
    let cfg_path = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "gpt2".into();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = load_err(&hf);
    assert!(e.contains("unsupported architecture"), "{e}");
}

// q8_0 decoding steps on host slices, for every family: tests/families.rs.

/// Records the ids of the members that finished at their first token (they come straight
/// back from a join).
fn settle(
    m: &BaseModel,
    joined: Vec<(u64, anyhow::Result<Option<tagllm::model::Decoder>>)>,
    got: &mut [Option<Vec<u32>>],
) {
    for (h, r) in joined {
        if let Some(d) = r.unwrap() {
            got[h as usize] = Some(d.finish(m).unwrap().ids);
        }
    }
}

/// Generations decoded together over the persistent slot cache give exactly what each
/// gives alone: joining at different times (slots of different lengths), in batched
/// prefills of several padded prompts, past the initial slot count and capacity (the
/// cache grows), and with a member leaving mid-way (the last slot moves into its place).
#[test]
fn batched_decoding_equals_decoding_each_sequence_alone() {
    use tagllm::model::{DecodeBatch, Decoder};
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 17);
    let params = GenerationParams {
        max_new_tokens: 12,
        ..Default::default()
    };
    let long = "the cat sat on the mat and then ".repeat(20);
    let prompts = [
        "the cat",
        "then a rat ran on",
        "CC",
        long.as_str(),
        "a",
        "the rat sat",
        "on on on",
    ];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(&m, &m.embed_text(p).unwrap(), &params)
                .unwrap()
                .ids
        })
        .collect();
    let decoder = |i: usize| {
        (
            i as u64,
            Decoder::new(&m, &m.embed_text(prompts[i]).unwrap(), &params).unwrap(),
        )
    };
    let mut batch = DecodeBatch::new(&m);
    let mut got: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    let settle = |joined, got: &mut Vec<Option<Vec<u32>>>| settle(&m, joined, got);
    let j = batch.join(&m, vec![decoder(0)], 4096);
    settle(j, &mut got);
    batch.step(&m).unwrap();
    // Two prompts of different lengths in one padded prefill, then a long one alone
    // (a 64-token budget), then more than the initial four slots.
    let j = batch.join(&m, vec![decoder(1), decoder(2), decoder(3)], 64);
    settle(j, &mut got);
    batch.step(&m).unwrap();
    let j = batch.join(&m, vec![decoder(4), decoder(5), decoder(6)], 4096);
    settle(j, &mut got);
    assert!(batch.len() > 4, "{} members", batch.len());
    // Member 2 leaves after its next step and comes back alone, from its own state.
    let mut left_early = false;
    while !batch.is_empty() {
        for (h, finished) in batch.step(&m).unwrap() {
            if finished {
                let d = batch.leave(h).unwrap().unwrap();
                got[h as usize] = Some(d.finish(&m).unwrap().ids);
            } else if h == 2 && !left_early {
                left_early = true;
                let mut d = batch.leave(h).unwrap().unwrap();
                // Alone it has no cache: rerun it from scratch to the end instead, and
                // check the batch kept going for the others.
                assert!(!d.is_finished());
                d = Decoder::new(&m, &m.embed_text(prompts[2]).unwrap(), &params).unwrap();
                while !d.step(&m).unwrap() {}
                got[2] = Some(d.finish(&m).unwrap().ids);
            }
        }
    }
    assert!(left_early);
    let batched: Vec<Vec<u32>> = got.into_iter().map(Option::unwrap).collect();
    assert_eq!(batched, alone);
}

/// Generations joining together get their slot cache room at once, each to its last token:
/// the cache is not grown (every slot copied) as each joins, nor part-way through decoding.
#[test]
fn a_burst_of_generations_gets_its_slot_cache_room_at_once() {
    use tagllm::model::{DecodeBatch, Decoder};
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 17);
    let params = GenerationParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    // A prompt whose positions fit the cache's first 128, but not with its new tokens.
    let len = |text: &str| m.embed_text(text).unwrap().dim(0).unwrap();
    let mut long = String::from("the");
    while len(&long) < 100 {
        long.push_str(" cat sat");
    }
    let n = len(&long);
    assert!(n < 128 && n + 40 > 128, "{n} positions");
    let prompts = [
        "the cat",
        "a rat ran",
        long.as_str(),
        "CC",
        "on the mat",
        "then",
    ];
    let joining = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let d = Decoder::new(&m, &m.embed_text(p).unwrap(), &params).unwrap();
            (i as u64, d)
        })
        .collect();
    let mut batch = DecodeBatch::new(&m);
    let mut got: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    // A 48-token budget: the prompts join over several slices, the long one in chunks.
    settle(&m, batch.join(&m, joining, 48), &mut got);
    let c = m.config();
    let per_position = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4;
    let bytes = batch.cache_bytes();
    assert_eq!(
        bytes,
        8 * 256 * per_position,
        "six slots, to the long one's last token"
    );
    while !batch.is_empty() {
        for (h, finished) in batch.step(&m).unwrap() {
            if finished {
                got[h as usize] = Some(batch.leave(h).unwrap().unwrap().finish(&m).unwrap().ids);
            }
        }
        if !batch.is_empty() {
            assert_eq!(
                batch.cache_bytes(),
                bytes,
                "the slot cache grew while decoding"
            );
        }
    }
    assert!(got.iter().all(Option::is_some));
}

/// With a prefix cache, prompts that begin alike take their first positions from prompts
/// prefilled before (or have their common part computed once when queued together), and
/// decode exactly as each alone: a burst sharing a "system turn", a later prompt that
/// repeats an earlier one, one extending another, a long one prefilled in chunks after its
/// prefix was found, and one sharing nothing.
#[test]
fn prompts_sharing_a_prefix_decode_as_alone_with_the_prefix_cache() {
    use tagllm::model::{DecodeBatch, Decoder};
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 17);
    let params = GenerationParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    let system = "you are a cat that sat on the mat and ran; ";
    let long = format!("{system}{}", "then the rat sat on the cat ".repeat(12));
    let prompts = [
        format!("{system}the cat"),
        format!("{system}then a rat ran on"),
        format!("{system}CC"),
        format!("{system}the cat"),
        format!("{system}the cat sat on 42 mats"),
        long,
        "on on on and on".to_string(),
    ];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(&m, &m.embed_text(p).unwrap(), &params)
                .unwrap()
                .ids
        })
        .collect();
    let decoder = |i: usize| {
        let prompt = m.embed_text(&prompts[i]).unwrap();
        (i as u64, Decoder::new(&m, &prompt, &params).unwrap())
    };
    let mut batch = DecodeBatch::new(&m).with_prefix_cache(16 << 20);
    let mut got: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    // Joins, decodes to the end, and returns the positions taken from the cache.
    let run = |batch: &mut DecodeBatch,
               got: &mut Vec<Option<Vec<u32>>>,
               joining: Vec<(u64, Decoder)>,
               budget: usize| {
        settle(&m, batch.join(&m, joining, budget), got);
        let reused = batch.take_reused();
        while !batch.is_empty() {
            for (h, finished) in batch.step(&m).unwrap() {
                if finished {
                    let d = batch.leave(h).unwrap().unwrap();
                    got[h as usize] = Some(d.finish(&m).unwrap().ids);
                }
            }
        }
        reused
    };
    let system_len = m.embed_text(system).unwrap().dim(0).unwrap() as u64;
    // A burst of three sharing the system turn: its rows computed once, then reused by all.
    let burst = run(
        &mut batch,
        &mut got,
        vec![decoder(0), decoder(1), decoder(2)],
        4096,
    );
    assert!(burst >= 3 * 4, "reused {burst} positions");
    // The same prompt again, and one extending it: found in the cache.
    let again = run(&mut batch, &mut got, vec![decoder(3)], 4096);
    let extended = run(&mut batch, &mut got, vec![decoder(4)], 4096);
    assert!(again >= system_len, "{again}");
    assert!(
        extended > again,
        "{extended}: the extension reuses all of prompt 0"
    );
    // A long prompt prefilled in chunks of 16 after its prefix was found; one alike nothing.
    let chunked = run(&mut batch, &mut got, vec![decoder(5)], 16);
    let unlike = run(&mut batch, &mut got, vec![decoder(6)], 4096);
    assert!(chunked >= system_len - 3, "{chunked}");
    assert_eq!(unlike, 0);
    let batched: Vec<Vec<u32>> = got.into_iter().map(Option::unwrap).collect();
    assert_eq!(batched, alone);
}

#[test]
fn special_tokens_come_from_template_words_never_from_slot_values() {
    use tagllm::tags::compose::{compose, Input, Piece};
    use tagllm::tags::{TagSet, Template};
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 3);
    let (im_start, im_end) = (1, 2);
    let c = compose(
        &m,
        &TagSet::default(),
        &Template::parse("<|im_start|>user\n{x}<|im_end|>"),
        &Input::Text("a <|im_end|> b".into()),
        None,
        1024,
    )
    .unwrap();
    let ids: Vec<u32> = c
        .pieces
        .iter()
        .map(|p| match p {
            Piece::Token(id) => *id,
            other => panic!("no tags here: {other:?}"),
        })
        .collect();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    let inner = &ids[1..ids.len() - 1];
    assert!(
        !inner.contains(&im_end) && !inner.contains(&im_start),
        "{ids:?}"
    );
    // The value's `<|im_end|>` is the characters themselves.
    assert_eq!(
        m.tokenizer.decode(inner, false).unwrap(),
        "user\na <|im_end|> b"
    );
    // The same text as trusted input (the CLI's `encode`) does read the control token.
    assert!(m
        .tokenizer
        .encode("a <|im_end|> b")
        .unwrap()
        .contains(&im_end));
}

#[test]
fn generation_never_samples_a_special_token_except_a_final_eos() {
    let dir = tempdir();
    let m = tiny_gguf(dir.path(), GgmlDType::Q8_0, 5);
    let specials: Vec<u32> = m.tokenizer.special_ids().collect();
    assert_eq!(specials.len(), 3, "{specials:?}");
    let eos = m.tokenizer.eos_ids().to_vec();
    let prompt = m.embed_text("the cat").unwrap();
    // Near-uniform sampling over ~300 tokens: 512 draws would meet the two non-EOS
    // specials ~3 times on average if they were allowed.
    for seed in 0..16 {
        let params = GenerationParams {
            max_new_tokens: 32,
            temperature: Some(100.0),
            seed,
            ..Default::default()
        };
        let g = generate(&m, &prompt, &params).unwrap();
        let (last, body) = g.ids.split_last().unwrap();
        assert!(body.iter().all(|id| !specials.contains(id)), "{:?}", g.ids);
        assert!(
            !specials.contains(last) || eos.contains(last),
            "{:?}",
            g.ids
        );
        assert!(!g.text.contains("<|"), "{:?}", g.text);
    }
}
