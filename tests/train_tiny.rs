//! Training on the tiny model: every stage lowers its loss, stages chain (stage-1 tags
//! frozen in stages 2 and 3), prefix reuse gives the gradients of full differentiation,
//! trained bundles load and serve, and bad jobs or data get useful errors.

mod common;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use serde_json::{json, Value};
use tagllm::model::BaseModel;
use tagllm::tags::{BaseModelIdentity, Registry, TagBundle, TagSet};
use tagllm::train::{Dataset, HeadKind, Hyperparameters, TrainJob, Trainer};

fn tiny() -> (tempfile::TempDir, BaseModel) {
    let dir = common::tempdir();
    let path = dir.path().join("tiny.gguf");
    tagllm::model::tiny::write_tiny_gguf(&path, GgmlDType::F32, 9, true).unwrap();
    let m = BaseModel::load(&path, &Device::Cpu).unwrap();
    (dir, m)
}

fn hyper(steps: usize, lr: f64) -> Hyperparameters {
    Hyperparameters {
        steps,
        batch_size: 4,
        learning_rate: lr,
        warmup_ratio: 0.0,
        num_vectors: 3,
        ..Default::default()
    }
}

fn molecules(n: usize) -> Dataset {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let smiles = "CCO".repeat(1 + i % 4) + &"N".repeat(i % 3);
            let y = smiles.len() as f64 / 4.0; // learnable from the input
            let class = if smiles.contains('N') {
                "amine"
            } else {
                "plain"
            };
            json!({"smiles": smiles, "y": y, "class": class, "name": format!("mol {}", i % 5)})
                .to_string()
        })
        .collect();
    Dataset::from_jsonl(&lines.join("\n")).unwrap()
}

fn text(n: usize) -> Dataset {
    let texts = ["the cat sat", "then the cat ran", "the rat sat on the mat"];
    let lines: Vec<String> = (0..n)
        .map(|i| json!({"text": texts[i % 3]}).to_string())
        .collect();
    Dataset::from_jsonl(&lines.join("\n")).unwrap()
}

fn job(
    stage: u8,
    tags: &[&str],
    template: &str,
    target: Option<&str>,
    head: HeadKind,
    h: Hyperparameters,
) -> TrainJob {
    TrainJob {
        stage,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        template: template.into(),
        target: target.map(String::from),
        head,
        target_range: None,
        hyperparameters: h,
    }
}

/// Stage 2: `<Size>` (a regression head on `y`) after the frozen `<SMILES>`.
fn size_job(h: Hyperparameters) -> TrainJob {
    job(
        2,
        &["Size"],
        "<SMILES> {smiles} size <Size>",
        Some("y"),
        HeadKind::Regression,
        h,
    )
}

/// Trains `j` and checks that the held-out loss went down.
fn train_lowers(
    m: &BaseModel,
    frozen: Arc<TagSet>,
    j: TrainJob,
    data: &Dataset,
    eval: &Dataset,
) -> tagllm::train::Trained {
    let what = format!("stage {} <{}>", j.stage, j.tags[0]);
    let t = Trainer::new(m, frozen, j, data, Some(eval)).unwrap();
    let before = t.evaluate().unwrap().0;
    let out = t
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    let after = out.eval["loss"].as_f64().unwrap();
    assert!(
        after < before,
        "{what} should lower the held-out loss: {before} -> {after}"
    );
    out
}

/// Stage 1 on unlabelled text; returns a tag set holding the learned domain tag.
fn stage1(m: &BaseModel, name: &str) -> Arc<TagSet> {
    let j = job(
        1,
        &[name],
        &format!("<{name}>{{text}}"),
        None,
        HeadKind::None,
        hyper(25, 0.05),
    );
    let out = train_lowers(m, Arc::new(TagSet::default()), j, &text(12), &text(6));
    assert!(out.eval["perplexity"].as_f64().unwrap() > 1.0);
    let mut set = TagSet::default();
    for b in out.bundles {
        set.tags.insert(b.name().to_string(), Arc::new(b));
    }
    Arc::new(set)
}

/// What a registry serves from a tags directory holding `frozen`'s tags and `trained`,
/// every bundle valid.
fn served(
    dir: &std::path::Path,
    m: &BaseModel,
    frozen: &TagSet,
    trained: &TagBundle,
) -> Arc<TagSet> {
    let tags = dir.join("tags");
    for b in frozen.tags.values() {
        b.save(&tags).unwrap();
    }
    trained.save(&tags).unwrap();
    let set = Registry::open(&tags, BaseModelIdentity::of(m), Device::Cpu)
        .unwrap()
        .snapshot();
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    set
}

#[test]
fn prefix_reuse_gives_the_gradients_of_full_differentiation() {
    let (_d, m) = tiny();
    let frozen = stage1(&m, "SMILES");
    let j = job(
        2,
        &["QED"],
        "A molecule: <SMILES> {smiles} has value <QED>",
        Some("y"),
        HeadKind::Regression,
        hyper(1, 1e-3),
    );
    let t = Trainer::new(&m, frozen, j, &molecules(8), None).unwrap();
    let full = t.gradients(&[0, 1, 2, 5], false).unwrap();
    let reused = t.gradients(&[0, 1, 2, 5], true).unwrap();
    // Again, the prefixes now coming from the trainer's per-example cache.
    let cached = t.gradients(&[2, 0, 1, 5], true).unwrap();
    let cached_mixed = t.gradients(&[0, 1, 2, 5], true).unwrap();
    assert_eq!(full.len(), 3); // tag vectors, head weight, head bias
    let pairs = full
        .iter()
        .zip(&reused)
        .chain(full.iter().zip(&cached))
        .chain(full.iter().zip(&cached_mixed));
    for (a, b) in pairs {
        let scale = common::max_abs(a);
        let diff = common::max_abs_diff(a, b);
        assert!(scale > 0.0, "a zero gradient proves nothing");
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "gradients differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn stages_chain_and_each_lowers_its_loss() {
    let (_d, m) = tiny();
    let smiles = stage1(&m, "SMILES");

    // Stage 2: regression with the stage-1 tag frozen.
    let j = size_job(hyper(40, 0.05));
    let out = train_lowers(&m, smiles.clone(), j, &molecules(24), &molecules(12));
    assert!(out.eval["mse"].as_f64().unwrap().is_finite());
    let size = &out.bundles[0];
    assert_eq!(size.manifest.domain_tags, vec!["SMILES"]);
    assert_eq!(size.manifest.provenance["frozen_tags"]["SMILES"], 1);

    // Stage 2: classification and generation heads.
    let j = job(
        2,
        &["Kind"],
        "<SMILES> {smiles} kind <Kind>",
        Some("class"),
        HeadKind::Classification,
        hyper(30, 0.05),
    );
    let out = train_lowers(&m, smiles.clone(), j, &molecules(24), &molecules(12));
    assert!(out.eval["accuracy"].as_f64().unwrap() >= 0.0);
    let j = job(
        2,
        &["Name"],
        "<SMILES> {smiles} is <Name>",
        Some("name"),
        HeadKind::None,
        hyper(30, 0.05),
    );
    train_lowers(&m, smiles.clone(), j, &molecules(10), &molecules(5));

    // Stage 3: a cross-domain template with two frozen domain tags.
    let prose = stage1(&m, "Prose");
    let mut both = (*smiles).clone_tags();
    both.tags.extend(prose.tags.clone());
    let j = job(
        3,
        &["Pair"],
        "<Prose> {name} with <SMILES> {smiles} gives <Pair>",
        Some("y"),
        HeadKind::Regression,
        hyper(30, 0.05),
    );
    train_lowers(&m, Arc::new(both), j, &molecules(24), &molecules(12));
}

#[test]
fn trained_bundles_are_served_by_the_registry() {
    let (dir, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let j = size_job(hyper(5, 0.05));
    let out = Trainer::new(&m, smiles.clone(), j, &molecules(8), Some(&molecules(4)))
        .unwrap()
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    let set = served(dir.path(), &m, &smiles, &out.bundles[0]);
    let size = set.get("Size").unwrap();
    assert_eq!(
        size.manifest.template.as_deref(),
        Some("<SMILES> {smiles} size <Size>")
    );
    assert!(size.head.is_some());
    assert_eq!(size.manifest.metrics, out.eval);
}

#[test]
fn cancelling_stops_the_run() {
    let (_d, m) = tiny();
    let j = job(
        1,
        &["Dom"],
        "<Dom>{text}",
        None,
        HeadKind::None,
        hyper(50, 0.01),
    );
    let t = Trainer::new(&m, Arc::new(TagSet::default()), j, &text(6), None).unwrap();
    let mut seen = 0;
    let e = t.run(None, &mut |p: &tagllm::train::Progress| {
        seen = p.step;
        p.step < 3
    });
    assert!(e.err().unwrap().to_string().contains("cancelled at step 3"));
    assert_eq!(seen, 3);
}

#[test]
fn progress_reports_each_steps_work() {
    let (_d, m) = tiny();
    let lens: Vec<usize> = ["the cat sat", "then the cat ran", "the rat sat on the mat"]
        .iter()
        .map(|t| 3 + m.tokenizer.encode_fragment(t).unwrap().len())
        .collect();
    let (shortest, longest) = (*lens.iter().min().unwrap(), *lens.iter().max().unwrap());
    for accum in [1, 2] {
        let h = Hyperparameters {
            grad_accum: accum,
            ..hyper(4, 0.01)
        };
        let j = job(1, &["Dom"], "<Dom>{text}", None, HeadKind::None, h);
        let t = Trainer::new(&m, Arc::new(TagSet::default()), j, &text(6), None).unwrap();
        let mut work = Vec::new();
        t.run(None, &mut |p: &tagllm::train::Progress| {
            work.push((p.examples, p.positions));
            true
        })
        .unwrap();
        assert_eq!(work.len(), 4);
        for (examples, positions) in work {
            // Each micro-batch of 4 is padded to its longest example.
            assert_eq!(examples, 4 * accum, "grad_accum {accum}");
            assert!(
                (examples * shortest..=examples * longest).contains(&positions),
                "{positions} positions for {examples} examples of {shortest}-{longest}"
            );
            if accum == 1 {
                assert_eq!(positions % examples, 0, "one padded batch");
            }
        }
    }
}

#[test]
fn bad_jobs_and_data_get_useful_errors() {
    let (_d, m) = tiny();
    let empty = Arc::new(TagSet::default());
    let err = |j: TrainJob, d: &Dataset| {
        format!(
            "{:#}",
            Trainer::new(&m, empty.clone(), j, d, None)
                .err()
                .expect("should fail")
        )
    };
    let h = || hyper(1, 1e-3);
    // A hidden layer too large to allocate is refused before anything is built.
    let huge = Hyperparameters {
        head_hidden: 1 << 30,
        ..h()
    };
    let e = err(
        job(
            2,
            &["Q"],
            "{smiles} <Q>",
            Some("y"),
            HeadKind::Regression,
            huge,
        ),
        &molecules(4),
    );
    assert!(e.contains("head_hidden must be in 0..=4096"), "{e}");
    // A hidden layer needs a head.
    let e = err(
        job(
            1,
            &["Q"],
            "<Q>{smiles}",
            None,
            HeadKind::None,
            Hyperparameters {
                head_hidden: 4,
                ..h()
            },
        ),
        &molecules(4),
    );
    assert!(
        e.contains("head_hidden needs a regression or classification head"),
        "{e}"
    );
    assert!(err(
        job(
            2,
            &["Q"],
            "<SMILES> {smiles} <Q>",
            Some("y"),
            HeadKind::Regression,
            h()
        ),
        &molecules(4)
    )
    .contains("unknown tag <SMILES>"));
    assert!(err(
        job(
            2,
            &["Q"],
            "{smiles} <Q>",
            Some("nope"),
            HeadKind::Regression,
            h()
        ),
        &molecules(4)
    )
    .contains("missing field `nope`"));
    let bad =
        Dataset::from_jsonl("{\"smiles\": \"C\", \"y\": 1}\n{\"smiles\": \"CC\", \"y\": \"high\"}")
            .unwrap();
    assert!(err(
        job(
            2,
            &["Q"],
            "{smiles} <Q>",
            Some("y"),
            HeadKind::Regression,
            h()
        ),
        &bad
    )
    .contains("line 2: field `y` is not a number"));
    assert!(err(
        job(
            2,
            &["Q"],
            "{nope} <Q>",
            Some("y"),
            HeadKind::Regression,
            h()
        ),
        &molecules(4)
    )
    .contains("missing field `nope`"));
    assert!(err(
        job(2, &["Q"], "{smiles}", Some("y"), HeadKind::Regression, h()),
        &molecules(4)
    )
    .contains("never uses <Q>"));
    assert!(err(
        job(1, &["D"], "<D>{text}", None, HeadKind::Regression, h()),
        &text(2)
    )
    .contains("stage 1"));
    assert!(err(
        job(4, &["D"], "<D>{text}", None, HeadKind::None, h()),
        &text(2)
    )
    .contains("stage must be 1, 2 or 3"));
    let one = Dataset::from_jsonl("{\"smiles\": \"C\", \"class\": \"a\"}").unwrap();
    assert!(err(
        job(
            2,
            &["Q"],
            "{smiles} <Q>",
            Some("class"),
            HeadKind::Classification,
            h()
        ),
        &one
    )
    .contains("two distinct labels"));
    assert!(err(
        job(
            2,
            &["Q"],
            "{smiles} <Q>",
            Some("y"),
            HeadKind::Regression,
            Hyperparameters {
                learning_rate: -1.0,
                ..h()
            }
        ),
        &molecules(4)
    )
    .contains("learning_rate"));
}

struct StopAfter {
    stop_after: usize,
    every: usize,
    saved: Option<tagllm::train::Checkpoint>,
}

impl tagllm::train::Hooks for StopAfter {
    fn progress(&mut self, p: &tagllm::train::Progress) -> bool {
        p.step <= self.stop_after
    }
    fn every(&self) -> usize {
        self.every
    }
    fn checkpoint(&mut self, c: &tagllm::train::Checkpoint) -> anyhow::Result<()> {
        self.saved = Some(c.clone());
        Ok(())
    }
}

#[test]
fn a_run_resumed_from_its_checkpoint_ends_like_an_uninterrupted_one() {
    let (dir, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let make = || {
        let j = size_job(hyper(10, 0.05));
        Trainer::new(&m, smiles.clone(), j, &molecules(12), Some(&molecules(4))).unwrap()
    };
    let straight = make()
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();

    let mut hooks = StopAfter {
        stop_after: 5,
        every: 5,
        saved: None,
    };
    let err = make().run(None, &mut hooks).err().unwrap();
    assert!(err.to_string().contains("cancelled at step 6"), "{err}");
    let ckpt = hooks.saved.expect("a checkpoint at step 5");
    assert_eq!(ckpt.step, 5);
    // Through the file, as a worker would.
    let path = dir.path().join("job.ckpt");
    ckpt.save(&path).unwrap();
    let ckpt = tagllm::train::Checkpoint::load(&path, &Device::Cpu).unwrap();
    let resumed = make()
        .run(Some(ckpt), &mut |p: &tagllm::train::Progress| {
            assert!(p.step > 5, "resumed runs start after the checkpoint");
            true
        })
        .unwrap();
    assert_eq!(resumed.steps_run, 10);
    // Equal up to float rounding: frozen prefixes are batched differently once cached.
    let diff = common::max_abs_diff(&straight.bundles[0].vectors, &resumed.bundles[0].vectors);
    assert!(
        diff < 1e-5,
        "resumed training must match the uninterrupted run (differs by {diff})"
    );
    let (a, b) = (
        straight.eval["loss"].as_f64().unwrap(),
        resumed.eval["loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-5 * a.abs().max(1.0),
        "eval loss {a} vs {b}"
    );
}

#[test]
fn without_an_eval_set_a_tenth_of_the_data_is_held_out() {
    let (_d, m) = tiny();
    let j = job(
        1,
        &["Dom"],
        "<Dom>{text}",
        None,
        HeadKind::None,
        hyper(2, 0.01),
    );
    let t = Trainer::new(&m, Arc::new(TagSet::default()), j, &text(30), None).unwrap();
    assert_eq!(t.train_len(), 27);
    let out = t
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    assert_eq!(out.eval["n"], 3, "{}", out.eval);
    // Small datasets keep every example for training.
    let j = job(
        1,
        &["Dom"],
        "<Dom>{text}",
        None,
        HeadKind::None,
        hyper(2, 0.01),
    );
    let t = Trainer::new(&m, Arc::new(TagSet::default()), j, &text(9), None).unwrap();
    assert_eq!(t.train_len(), 9);
}

/// Multi-task data (one translation direction per record, say) carries its own template
/// per record: the records below differ only in their template, so the held-out accuracy
/// is perfect only if every record is composed with its own.
#[test]
fn records_may_carry_their_own_template() {
    let (_d, m) = tiny();
    let mut both = (*stage1(&m, "SMILES")).clone_tags();
    both.tags.extend(stage1(&m, "Prose").tags.clone());
    let both = Arc::new(both);
    // (The two stage-1 tags learn the same text from the same start, so the words differ too.)
    let forward = "up <Prose> {text} <Dir>";
    let backward = "down <SMILES> {text} <Dir>";
    let records = |n: usize| {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let (template, label) = if i % 2 == 0 {
                    (forward, "fwd")
                } else {
                    (backward, "bwd")
                };
                json!({"text": "the cat sat", "dir": label, "template": template}).to_string()
            })
            .collect();
        Dataset::from_jsonl(&lines.join("\n")).unwrap()
    };
    let j = job(
        3,
        &["Dir"],
        forward,
        Some("dir"),
        HeadKind::Classification,
        hyper(40, 0.05),
    );
    let out = train_lowers(&m, both.clone(), j.clone(), &records(16), &records(8));
    assert_eq!(out.eval["accuracy"].as_f64().unwrap(), 1.0, "{}", out.eval);
    // The published tag keeps the job's template as its default.
    assert_eq!(out.bundles[0].manifest.template.as_deref(), Some(forward));

    // Every record template is checked like the job's.
    let err = |data: Dataset| {
        format!(
            "{:#}",
            Trainer::new(&m, both.clone(), j.clone(), &data, None)
                .err()
                .expect("should fail")
        )
    };
    let one = |template: &str, text: Value| {
        Dataset::from_values(&[json!({"text": "x", "dir": "fwd"}), {
            let mut r = json!({"dir": "bwd", "template": template});
            if !text.is_null() {
                r["text"] = text;
            }
            r
        }])
        .unwrap()
    };
    let e = err(one("<Prose> {text}", json!("y")));
    assert!(
        e.contains("template \"<Prose> {text}\" never uses <Dir>"),
        "{e}"
    );
    let e = err(one("<Nope> {text} <Dir>", json!("y")));
    assert!(e.contains("unknown tag <Nope>"), "{e}");
    let e = err(one("<Prose> {text} <Dir>", Value::Null));
    assert!(e.contains("line 2: missing field `text`"), "{e}");
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting (test-side, on purpose
/// not the trainer's Cholesky).
fn gauss_solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..n {
            let f = a[r][c] / a[c][c];
            let (top, bottom) = a.split_at_mut(r);
            for (x, &y) in bottom[0][c..n].iter_mut().zip(&top[c][c..n]) {
                *x -= f * y;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        x[r] = (b[r] - (r + 1..n).map(|k| a[r][k] * x[k]).sum::<f64>()) / a[r][r];
    }
    x
}

/// The head fitted before step 1 is the least-squares fit of the standardised targets on
/// the features at the function tag: checked against a direct solve of the normal
/// equations in raw units (with the ridge penalty the trainer chose, which is tiny here).
#[test]
fn ridge_head_initialisation_is_the_least_squares_fit() {
    ridge_head_is_the_least_squares_fit(1);
}

/// The same with a head that reads all three of its tag's positions: its features are the
/// three hidden states side by side, and the fit is still the direct least squares.
#[test]
fn a_ridge_head_over_every_tag_position_is_the_least_squares_fit() {
    ridge_head_is_the_least_squares_fit(3);
}

fn ridge_head_is_the_least_squares_fit(head_positions: usize) {
    let (dir, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let frozen = smiles.clone();
    let h = Hyperparameters {
        head_learning_rate: Some(1e-12),
        head_positions,
        ..hyper(1, 1e-12) // one step that moves nothing: the published head is the fit
    };
    let j = size_job(h);
    let t = Trainer::new(&m, smiles, j, &molecules(160), Some(&molecules(40))).unwrap();
    let (x, z) = t.head_features().unwrap();
    let hidden = m.config().hidden_size;
    assert_eq!(x[0].len(), head_positions * hidden);
    let out = t
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    let bundle = &out.bundles[0];
    assert_eq!(bundle.manifest.head_positions, head_positions);
    let fit = &bundle.manifest.provenance["head_fit"];
    assert_eq!(fit["method"], "ridge", "{fit}");
    let lambda = fit["lambda"].as_f64().unwrap();
    let head = bundle.head.as_ref().unwrap();
    let w: Vec<f32> = head.weight.flatten_all().unwrap().to_vec1().unwrap();
    let b: f32 = head.bias.to_vec1::<f32>().unwrap()[0];

    // min |z - X w - b|^2 + lambda n sum_j (sd_j w_j)^2 over [w, b], intercept unpenalised.
    let (n, d) = (x.len(), x[0].len());
    let mean: Vec<f64> = (0..d)
        .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let var: Vec<f64> = (0..d)
        .map(|j| x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64)
        .collect();
    let mut a = vec![vec![0.0; d + 1]; d + 1];
    let mut rhs = vec![0.0; d + 1];
    for (r, t) in x.iter().zip(&z) {
        let row: Vec<f64> = r.iter().copied().chain([1.0]).collect();
        for i in 0..=d {
            rhs[i] += row[i] * t;
            for k in 0..=d {
                a[i][k] += row[i] * row[k];
            }
        }
    }
    for j in 0..d {
        a[j][j] += lambda * n as f64 * var[j].max(1e-12);
    }
    let direct = gauss_solve(a, rhs);
    let predict =
        |r: &[f64], w: &[f64], b: f64| r.iter().zip(w).map(|(a, c)| a * c).sum::<f64>() + b;
    let w64: Vec<f64> = w.iter().map(|v| *v as f64).collect();
    let mut worst = 0f64;
    for r in &x {
        let ours = predict(r, &w64, b as f64);
        let theirs = predict(r, &direct[..d], direct[d]);
        worst = worst.max((ours - theirs).abs());
    }
    assert!(
        worst < 1e-3,
        "fitted head and direct least squares differ by {worst} on the training features"
    );
    // And the fit is a real fit: better than predicting the mean on the training set.
    let mse = x
        .iter()
        .zip(&z)
        .map(|(r, t)| (predict(r, &w64, b as f64) - t).powi(2))
        .sum::<f64>()
        / n as f64;
    assert!(
        mse < 0.5,
        "training MSE of the fitted head {mse} (the mean gives 1.0)"
    );
    assert!(out.eval["step0"]["mse"].as_f64().is_some(), "{}", out.eval);

    // Served, the bundle's head reads what the trainer fitted it on: its predictions are
    // the fit applied to the trainer's features, in the target's units.
    let set = served(dir.path(), &m, &frozen, bundle);
    let template = tagllm::tags::Template::parse("<SMILES> {smiles} size <Size>");
    let data = molecules(160);
    let composed: Vec<_> = data.records[..8]
        .iter()
        .map(|r| {
            let input = tagllm::tags::compose::Input::Text(r["smiles"].clone());
            tagllm::tags::compose::compose(&m, &set, &template, &input, None, 1024).unwrap()
        })
        .collect();
    let seqs: Vec<_> = composed.iter().collect();
    let served = tagllm::infer::heads::padded_heads(&m, &seqs).unwrap();
    let tagllm::tags::HeadSpec::Regression {
        target_mean,
        target_std,
        ..
    } = head.spec
    else {
        panic!("a regression head")
    };
    for (i, p) in served.iter().enumerate() {
        let tagllm::infer::Prediction::Value { value } = p else {
            panic!("{p:?}")
        };
        let want = predict(&x[i], &w64, b as f64) * target_std + target_mean;
        assert!(
            (value - want).abs() < 1e-3 * target_std,
            "example {i}: served {value}, the fit on the trainer's features {want}"
        );
    }
}

/// `init: text:PHRASE` starts the tag at the phrase's token embeddings (cycled to p rows);
/// `init: tag:NAME` at a copy of a served tag.
#[test]
fn text_and_tag_initialisation_reproduce_their_source() {
    let (_d, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let start = |init: &str, frozen: Arc<TagSet>| {
        let h = Hyperparameters {
            num_vectors: 5,
            init: init.into(),
            ..hyper(1, 1e-12)
        };
        let j = job(1, &["Dom"], "<Dom>{text}", None, HeadKind::None, h);
        let out = Trainer::new(&m, frozen, j, &text(6), None)
            .unwrap()
            .run(None, &mut |_: &tagllm::train::Progress| true)
            .unwrap();
        out.bundles[0].vectors.clone()
    };
    let ids = m.tokenizer.encode_fragment("the cat").unwrap();
    assert!(
        ids.len() > 5,
        "{ids:?}: the phrase should be cut to p = 5 (the tag below is cycled)"
    );
    let rows = m.llama.embed_ids(&ids).unwrap();
    let cycled: Vec<u32> = (0..5).map(|i| (i % ids.len()) as u32).collect();
    let want = rows
        .index_select(
            &candle_core::Tensor::new(cycled.as_slice(), &Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
    let got = start("text:the cat", Arc::new(TagSet::default()));
    assert!(common::max_abs_diff(&got, &want) < 1e-6);

    let source = smiles.get("SMILES").unwrap().vectors.clone(); // 3 rows, cycled to 5
    let want = source
        .index_select(
            &candle_core::Tensor::new(&[0u32, 1, 2, 0, 1], &Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
    let got = start("tag:SMILES", smiles.clone());
    assert!(common::max_abs_diff(&got, &want) < 1e-6);

    let e = Trainer::new(
        &m,
        smiles,
        job(
            1,
            &["Dom"],
            "<Dom>{text}",
            None,
            HeadKind::None,
            Hyperparameters {
                init: "tag:Nope".into(),
                ..hyper(1, 0.1)
            },
        ),
        &text(6),
        None,
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("no served tag <Nope>"), "{e:#}");
}

/// The initialisation is evaluated as step 0 and competes for publication: when training
/// only makes things worse, the published tag is the initial one, with step 0's metrics.
#[test]
fn step0_selection_keeps_the_initial_tag_when_training_only_makes_it_worse() {
    let (_d, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let h = Hyperparameters {
        warmup_ratio: 0.0,
        eval_every: 1,
        ..hyper(3, 2.0) // a step this large wrecks the fitted start
    };
    let j = size_job(h);
    let t = Trainer::new(&m, smiles, j, &molecules(40), Some(&molecules(12))).unwrap();
    let mut evals = Vec::new();
    let out = t
        .run(None, &mut |p: &tagllm::train::Progress| {
            evals.push(p.eval.as_ref().unwrap()["loss"].as_f64().unwrap());
            true
        })
        .unwrap();
    let step0 = out.eval["step0"]["loss"].as_f64().unwrap();
    assert!(
        evals.iter().all(|l| *l > step0),
        "training should only hurt here: {step0} then {evals:?}"
    );
    assert_eq!(out.best_step, 0);
    assert_eq!(out.bundles[0].manifest.provenance["best_step"], 0);
    assert!(out.bundles[0].manifest.provenance["head_refit"].is_null());
    assert!((out.eval["loss"].as_f64().unwrap() - step0).abs() < 1e-6 * step0.max(1.0));
    let init = tagllm::train::mean_embedding_init(&m, 3).unwrap();
    assert!(common::max_abs_diff(&out.bundles[0].vectors, &init) < 1e-7);
}

/// A sweep's runs all start from the same initialisation (a run in the sweep ends exactly
/// like the same settings trained alone), and the job then trains with the best pair.
#[test]
fn a_sweep_starts_every_run_from_the_same_point_and_trains_with_the_best() {
    let (_d, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let base = Hyperparameters {
        warmup_ratio: 0.0,
        eval_every: 1,
        steps: 6,
        head_learning_rate: Some(0.001),
        ..hyper(6, 0.01)
    };
    let make = |h: Hyperparameters| {
        let j = size_job(h);
        Trainer::new(&m, smiles.clone(), j, &molecules(40), Some(&molecules(12))).unwrap()
    };
    let mut t = make(base.clone());
    let mut seen = Vec::new();
    let runs = t
        .sweep(&[2.0, 0.01], &[2, 4], 3, 1, &mut |run, p| {
            seen.push((run.learning_rate, run.batch_size, p.step));
            true
        })
        .unwrap();
    assert_eq!(runs.len(), 4);
    assert_eq!(seen.len(), 12, "three steps per run: {seen:?}");
    // The last run (lr 0.01, batch 4) alone, from a fresh trainer, ends the same way.
    let alone = Hyperparameters {
        learning_rate: 0.01,
        head_learning_rate: Some(0.01 * 0.001 / 0.01),
        batch_size: 4,
        steps: 3,
        eval_every: 1,
        ..base.clone()
    };
    let mut best_alone = f64::NAN;
    make(alone)
        .run(None, &mut |p: &tagllm::train::Progress| {
            best_alone = p.best_eval_loss.unwrap();
            true
        })
        .unwrap();
    let last = &runs[3];
    assert_eq!((last.learning_rate, last.batch_size), (0.01, 4));
    assert!(
        (last.best_eval_loss - best_alone).abs() < 1e-6 * best_alone.max(1.0),
        "sweep run {} vs alone {best_alone}",
        last.best_eval_loss
    );
    let winner = runs
        .iter()
        .min_by(|a, b| a.best_eval_loss.total_cmp(&b.best_eval_loss))
        .unwrap()
        .clone();
    assert_eq!(t.total_steps(), 6, "the job's own step count comes back");
    let out = t
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    let p = &out.bundles[0].manifest.provenance;
    assert_eq!(p["hyperparameters"]["learning_rate"], winner.learning_rate);
    assert_eq!(p["hyperparameters"]["batch_size"], winner.batch_size);
    assert_eq!(p["sweep"]["runs"].as_array().unwrap().len(), 4);
    assert_eq!(p["steps_run"], 6);
}

/// After tag training the head is fitted again on the trained tags' features, and kept
/// only when held-out loss improves; the published metrics are those of the head kept.
#[test]
fn the_head_is_refitted_on_the_trained_tags_and_kept_only_when_better() {
    let (_d, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let h = Hyperparameters {
        warmup_ratio: 0.0,
        eval_every: 2,
        // The paper's random head: tag training beats its step 0 for sure.
        head_init: tagllm::train::HeadInit::Random,
        ..hyper(20, 0.01)
    };
    let j = size_job(h);
    let t = Trainer::new(&m, smiles, j, &molecules(40), Some(&molecules(12))).unwrap();
    let out = t
        .run(None, &mut |_: &tagllm::train::Progress| true)
        .unwrap();
    assert!(out.best_step > 0, "training should help here");
    let refit = &out.bundles[0].manifest.provenance["head_refit"];
    let (before, after) = (
        refit["validation_loss_before"].as_f64().unwrap(),
        refit["validation_loss_after"].as_f64().unwrap(),
    );
    let published = out.eval["loss"].as_f64().unwrap();
    let kept = refit["kept"].as_bool().unwrap();
    assert_eq!(kept, after < before, "{refit}");
    let expected = if kept { after } else { before };
    assert!(
        (published - expected).abs() < 1e-6 * expected.max(1.0),
        "published {published}, refit {refit}"
    );
    assert!(published <= before + 1e-9);
}

/// A target range travels from the job into the published head, and the data must lie in
/// it: a value outside is refused with its line, as is a range on a head that is not a
/// regression's.
#[test]
fn a_target_range_reaches_the_head_and_the_data_must_lie_in_it() {
    let (_dir, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    // The molecules' targets lie in [0.75, 3.5].
    let ranged = |range| TrainJob {
        target_range: Some(range),
        ..size_job(hyper(3, 0.05))
    };
    let out = Trainer::new(
        &m,
        smiles.clone(),
        ranged([0.5, 4.0]),
        &molecules(8),
        Some(&molecules(4)),
    )
    .unwrap()
    .run(None, &mut |_: &tagllm::train::Progress| true)
    .unwrap();
    let tagllm::tags::HeadSpec::Regression { range, .. } =
        out.bundles[0].head.as_ref().unwrap().spec
    else {
        panic!("a regression job publishes a regression head")
    };
    assert_eq!(range, Some([0.5, 4.0]));
    let err = |job: TrainJob| {
        format!(
            "{:#}",
            Trainer::new(&m, smiles.clone(), job, &molecules(8), Some(&molecules(4)))
                .err()
                .unwrap()
        )
    };
    let e = err(ranged([1.0, 4.0]));
    assert!(
        e.contains("training data line 1") && e.contains("outside target_range"),
        "{e}"
    );
    let e = err(ranged([2.0, 1.0]));
    assert!(e.contains("target_range must be"), "{e}");
    let e = err(TrainJob {
        head: HeadKind::Classification,
        target: Some("class".into()),
        ..ranged([0.0, 1.0])
    });
    assert!(e.contains("target_range is for a regression head"), "{e}");
}

/// An MLP head (a tanh hidden layer before the output): backprop's gradients of every one
/// of its parameters, and of the tag, match finite differences of the loss.
#[test]
fn an_mlp_heads_gradients_match_finite_differences() {
    let (_d, m) = tiny();
    let frozen = stage1(&m, "SMILES");
    let h = Hyperparameters {
        head_hidden: 5,
        head_init: tagllm::train::HeadInit::Random,
        ..hyper(1, 1e-3)
    };
    let t = Trainer::new(&m, frozen, size_job(h), &molecules(8), None).unwrap();
    let batch = [0, 1, 2, 5];
    let grads = t.gradients(&batch, false).unwrap();
    let params = t.parameters();
    // The tag, the output layer (weight, bias), the hidden layer (weight, bias).
    assert_eq!(params.len(), 5);
    assert_eq!(params[3].dims(), [5, m.config().hidden_size]);
    let eps = 1e-2f32;
    let mut largest_hidden = 0f32;
    for (p, at) in [(0, 7), (1, 2), (2, 0), (3, 0), (3, 11), (3, 40), (4, 3)] {
        let var = &params[p];
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let loss_at = |delta: f32| {
            let mut v = base.clone();
            v[at] += delta;
            var.set(&candle_core::Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            t.batch_loss(&batch).unwrap() as f32
        };
        let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
        loss_at(0.0);
        let g = grads[p].flatten_all().unwrap().to_vec1::<f32>().unwrap()[at];
        assert!(
            (fd - g).abs() <= 2e-2 * fd.abs().max(g.abs()).max(0.05),
            "parameter {p}[{at}]: backprop {g}, finite differences {fd}"
        );
        if p >= 3 {
            largest_hidden = largest_hidden.max(fd.abs());
        }
    }
    // The hidden layer's gradients are not vanishing: the comparison means something.
    assert!(
        largest_hidden > 1e-3,
        "hidden-layer gradients ~0 ({largest_hidden})"
    );
}

/// An MLP head trains (its output layer fitted on its hidden units' activations first), is
/// published with its hidden layer, and is served by the registry.
#[test]
fn an_mlp_head_is_fitted_trained_published_and_served() {
    let (dir, m) = tiny();
    let smiles = stage1(&m, "SMILES");
    let h = Hyperparameters {
        head_hidden: 8,
        ..hyper(10, 0.05)
    };
    let out = train_lowers(
        &m,
        smiles.clone(),
        size_job(h),
        &molecules(16),
        &molecules(6),
    );
    let fit = &out.bundles[0].manifest.provenance["head_fit"];
    assert_eq!(fit["method"], "ridge", "{fit}");
    let set = served(dir.path(), &m, &smiles, &out.bundles[0]);
    let size = set.get("Size").unwrap();
    assert_eq!(size.manifest.head_hidden, 8);
    let head = size.head.as_ref().unwrap();
    let (w, b) = head.hidden.as_ref().unwrap();
    assert_eq!(w.dims(), [8, m.config().hidden_size]);
    assert_eq!(b.dims(), [8]);
    assert_eq!(head.weight.dims(), [1, 8]);
}
