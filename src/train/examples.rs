//! Records turned into training examples: composed exactly as they will be served
//! (learned tags stand in under their names), with what each example is trained against.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::data::{slot_input, Dataset};
use super::job::{record_template, Target, TrainJob};
use crate::model::BaseModel;
use crate::tags::compose::{compose, Piece};
use crate::tags::{Head, HeadSpec, TagBundle, TagKind, TagManifest, TagSet, Template};

pub(super) struct Example {
    /// Unique across the training and evaluation sets: the key of its cached prefix.
    pub id: usize,
    pub pieces: Vec<Piece>,
    /// Index of the first learned tag row: everything before it is frozen.
    pub first_learned: usize,
    /// Position whose hidden state the head reads.
    pub readout: Option<usize>,
    /// (position, next token id): positions whose logits predict a token.
    pub lm: Vec<(usize, u32)>,
    pub value: f64,
    pub class: u32,
}

/// The served tags plus a placeholder for each learned one, to compose examples with.
pub(super) fn compose_set(
    frozen: &TagSet,
    learned: &[String],
    p: usize,
    with_head: bool,
) -> Result<TagSet> {
    let mut set = frozen.clone_tags();
    for t in learned {
        set.tags.insert(
            t.clone(),
            std::sync::Arc::new(placeholder(t, p, with_head)?),
        );
    }
    Ok(set)
}

/// Composes every record of `data`; ids start at `id_base`. `templates` holds every
/// template the data uses, parsed; the records' slots are already checked.
pub(super) fn build(
    model: &BaseModel,
    job: &TrainJob,
    target: &Target,
    templates: &BTreeMap<String, Template>,
    set: &TagSet,
    data: &Dataset,
    id_base: usize,
) -> Result<Vec<Example>> {
    let max = model.config().max_position_embeddings;
    let function = (!matches!(target, Target::Lm)).then(|| job.tags[0].as_str());
    let eos = model.tokenizer.eos_ids().first().copied();
    let field = job.target.as_deref().unwrap_or("");
    let learned = |name: &str| job.tags.iter().any(|t| t == name);
    data.records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let line = i + 1;
            let template = &templates[record_template(r, &job.template)];
            let input = slot_input(r, &template.slots());
            let c = compose(model, set, template, &input, function, max)
                .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
            let mut pieces = c.pieces.clone();
            let first_learned = pieces
                .iter()
                .position(|p| matches!(p, Piece::TagRow { name, .. } if learned(name)))
                .context("the template uses a learned tag")?;
            let mut ex = Example {
                id: id_base + i,
                pieces: Vec::new(),
                first_learned,
                readout: c.head.as_ref().map(|(_, p)| *p),
                lm: Vec::new(),
                value: 0.0,
                class: 0,
            };
            match target {
                Target::Lm => {
                    // Predict every text token after the first learned tag.
                    for (j, piece) in pieces.iter().enumerate().skip(first_learned + 1) {
                        if let Piece::Token(id) = piece {
                            ex.lm.push((j - 1, *id));
                        }
                    }
                    ensure!(
                        !ex.lm.is_empty(),
                        "line {line}: no text after the tag to learn from"
                    );
                }
                Target::Generation => {
                    let mut ids = model.tokenizer.encode_fragment(&r[field])?;
                    ids.extend(eos);
                    for id in ids {
                        ex.lm.push((pieces.len() - 1, id));
                        pieces.push(Piece::Token(id));
                    }
                    pieces.pop(); // the last target token is predicted, never read
                }
                Target::Regression { .. } => {
                    ex.value = r[field].trim().parse().context("validated as numeric")?;
                }
                Target::Classification { labels } => {
                    ex.class = labels.iter().position(|l| *l == r[field]).unwrap_or(0) as u32;
                }
            }
            ensure!(
                pieces.len() <= max,
                "line {line}: {} positions exceed the model's context {max}",
                pieces.len()
            );
            ex.pieces = pieces;
            Ok(ex)
        })
        .collect()
}

/// A stand-in for a tag being learned, so that examples compose exactly as they will be
/// served: right name and length, and a head where one will be read.
fn placeholder(name: &str, p: usize, with_head: bool) -> Result<TagBundle> {
    let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
    let head = match with_head {
        true => Some(Head {
            spec: HeadSpec::Regression {
                target_mean: 0.0,
                target_std: 1.0,
                range: None,
            },
            positions: 1,
            hidden: None,
            weight: zeros((1, 1))?,
            bias: zeros((1, 1))?.flatten_all()?,
        }),
        false => None,
    };
    Ok(TagBundle {
        manifest: TagManifest {
            name: name.into(),
            kind: TagKind::Function,
            version: 0,
            num_vectors: p,
            hidden_size: 1,
            base_model: String::new(),
            head_positions: 1,
            head_hidden: 0,
            head: head.as_ref().map(|h| h.spec.clone()),
            template: None,
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
        },
        vectors: zeros((p, 1))?,
        head,
        source: "training",
    })
}
