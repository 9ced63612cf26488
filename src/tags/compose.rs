//! Turns a template, tags and one input into the sequence the model reads: token ids and
//! tag vectors, spliced in template order. Slot values are plain text, never parsed.
//! Serving and training both compose through here, so a tag is trained on exactly the
//! sequences it will be served with.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use super::{Head, Segment, TagBundle, TagSet, Template};
use crate::model::tokenizer::Fragment;
use crate::model::BaseModel;

/// One example's input: named slot values, or a bare string for a single-slot template.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Slots(BTreeMap<String, String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComposeError {
    #[error("unknown tag <{0}>")]
    UnknownTag(String),
    #[error("missing value for slot {{{0}}}")]
    MissingSlot(String),
    #[error("input has a value for `{0}`, which the template has no slot for")]
    UnexpectedSlot(String),
    #[error("a bare string input needs a template with exactly one slot; this one has {0}")]
    BareInput(usize),
    #[error("input is {len} tokens long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("tokenizing the input failed: {0}")]
    Tokenize(String),
    #[error("the template and input give an empty sequence: nothing to run the model on")]
    Empty,
}

/// One position of a composed sequence. Equal pieces embed equally, which is what lets
/// several sequences share a common prefix exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Token(u32),
    /// Row `row` of tag `name` at `version`.
    TagRow {
        name: String,
        version: u64,
        row: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Composed {
    pub pieces: Vec<Piece>,
    /// Versions of every tag used.
    pub versions: BTreeMap<String, u64>,
    /// The head to apply and the position it reads (last row of its tag's last use).
    pub head: Option<(Arc<TagBundle>, usize)>,
    /// The bundles referenced, to embed the pieces.
    bundles: BTreeMap<String, Arc<TagBundle>>,
}

impl Composed {
    /// Plain tokens and no tags (for tests of what handles sequences by their length).
    #[cfg(test)]
    pub(crate) fn of_tokens(ids: &[u32]) -> Self {
        Self {
            pieces: ids.iter().map(|&id| Piece::Token(id)).collect(),
            versions: BTreeMap::new(),
            head: None,
            bundles: BTreeMap::new(),
        }
    }

    /// Plain tokens read by a (zero) regression head of width `d` at the last one, as a
    /// head request's sequence is.
    #[cfg(test)]
    pub(crate) fn of_head_tokens(ids: &[u32], d: usize) -> Self {
        use candle_core::{DType, Device};
        let spec = super::HeadSpec::Regression {
            target_mean: 0.0,
            target_std: 1.0,
            range: None,
        };
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let bundle = TagBundle {
            manifest: super::TagManifest {
                name: "Head".into(),
                kind: super::TagKind::Function,
                version: 1,
                num_vectors: 1,
                hidden_size: d,
                base_model: String::new(),
                head: Some(spec.clone()),
                head_positions: 1,
                head_hidden: 0,
                template: None,
                domain_tags: vec![],
                tensors_sha256: None,
                provenance: serde_json::Value::Null,
                metrics: serde_json::Value::Null,
            },
            vectors: zeros((1, d)).unwrap(),
            head: Some(Head {
                spec,
                positions: 1,
                hidden: None,
                weight: zeros((1, d)).unwrap(),
                bias: Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
            }),
            source: "bundle",
        };
        Self {
            head: Some((Arc::new(bundle), ids.len().saturating_sub(1))),
            ..Self::of_tokens(ids)
        }
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref().and_then(|(b, _)| b.head.as_ref())
    }

    /// The position the head reads, if the sequence has a head.
    pub fn readout(&self) -> Option<usize> {
        self.head.as_ref().map(|(_, at)| *at)
    }

    /// Every position the head reads, in order: its tag's last `positions` rows, ending
    /// at [`Composed::readout`] (a bundle's head never reads more rows than its tag has).
    pub fn head_reads(&self) -> Option<std::ops::Range<usize>> {
        let (at, positions) = (self.readout()?, self.head()?.positions);
        Some(at + 1 - positions..at + 1)
    }

    /// Input embeddings `[n, d]` for `pieces[range]`.
    pub fn embed(&self, model: &BaseModel, start: usize) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut ids = Vec::new();
        for piece in &self.pieces[start..] {
            match piece {
                Piece::Token(id) => ids.push(*id),
                Piece::TagRow { name, row, .. } => {
                    if !ids.is_empty() {
                        parts.push(model.llama.embed_ids(&std::mem::take(&mut ids))?);
                    }
                    parts.push(self.bundles[name].vectors.narrow(0, *row, 1)?);
                }
            }
        }
        if !ids.is_empty() {
            parts.push(model.llama.embed_ids(&ids)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Checks that every tag of `template` is registered, before any input is looked at.
pub fn resolve_tags(template: &Template, tags: &TagSet) -> Result<(), ComposeError> {
    for t in template.tags() {
        if tags.get(t).is_none() {
            return Err(ComposeError::UnknownTag(t.to_string()));
        }
    }
    Ok(())
}

/// Composes one input. `head_tag` names the function tag whose head is read (its last
/// occurrence); `None` picks the last tag in the template that owns a head, if any.
pub fn compose(
    model: &BaseModel,
    tags: &TagSet,
    template: &Template,
    input: &Input,
    head_tag: Option<&str>,
    max_tokens: usize,
) -> Result<Composed, ComposeError> {
    resolve_tags(template, tags)?;
    let slots = template.slots();
    let values: BTreeMap<String, String> = match input {
        Input::Text(s) => {
            if slots.len() != 1 {
                return Err(ComposeError::BareInput(slots.len()));
            }
            BTreeMap::from([(slots[0].to_string(), s.clone())])
        }
        Input::Slots(m) => m.clone(),
    };
    if let Some(extra) = values.keys().find(|k| !slots.contains(&k.as_str())) {
        return Err(ComposeError::UnexpectedSlot(extra.clone()));
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let mut text = String::new();
    let mut versions = BTreeMap::new();
    let mut bundles = BTreeMap::new();
    let mut head = None;
    // A BOS, where the model wants one, starts the whole sequence.
    let tokenize_err = |e: anyhow::Error| ComposeError::Tokenize(format!("{e:#}"));
    let bos = model.tokenizer.encode("").map_err(tokenize_err)?;
    pieces.extend(bos.into_iter().map(Piece::Token));
    let flush = |text: &mut String, pieces: &mut Vec<Piece>| -> Result<(), ComposeError> {
        if !text.is_empty() {
            let ids = model
                .tokenizer
                .encode_fragment(text)
                .map_err(tokenize_err)?;
            pieces.extend(ids.into_iter().map(Piece::Token));
            text.clear();
        }
        Ok(())
    };
    for seg in &template.segments {
        match seg {
            // The template's own words may hold special tokens (a chat turn); a slot's
            // value never does: it is tokenised as plain text by `flush`.
            Segment::Text(t) => {
                for fragment in model.tokenizer.split_specials(t) {
                    match fragment {
                        Fragment::Text(s) => text.push_str(s),
                        Fragment::Special(id) => {
                            flush(&mut text, &mut pieces)?;
                            pieces.push(Piece::Token(id));
                        }
                    }
                }
            }
            Segment::Slot(name) => text.push_str(
                values
                    .get(name)
                    .ok_or_else(|| ComposeError::MissingSlot(name.clone()))?,
            ),
            Segment::Tag(name) => {
                flush(&mut text, &mut pieces)?;
                let bundle = tags
                    .get(name)
                    .ok_or_else(|| ComposeError::UnknownTag(name.clone()))?;
                for row in 0..bundle.num_vectors() {
                    pieces.push(Piece::TagRow {
                        name: name.clone(),
                        version: bundle.version(),
                        row,
                    });
                }
                versions.insert(name.clone(), bundle.version());
                bundles.insert(name.clone(), bundle.clone());
                let wanted = match head_tag {
                    Some(h) => h == name,
                    None => bundle.head.is_some(),
                };
                if wanted {
                    head = Some((bundle.clone(), pieces.len() - 1));
                }
            }
        }
    }
    flush(&mut text, &mut pieces)?;
    if pieces.is_empty() {
        return Err(ComposeError::Empty);
    }
    if pieces.len() > max_tokens {
        return Err(ComposeError::TooLong {
            len: pieces.len(),
            max: max_tokens,
        });
    }
    let head = head.filter(|(b, _)| b.head.is_some());
    Ok(Composed {
        pieces,
        versions,
        head,
        bundles,
    })
}

/// Length of the longest prefix all `seqs` share.
pub fn common_prefix(seqs: &[&Composed]) -> usize {
    let Some(first) = seqs.first() else { return 0 };
    (0..first.len())
        .take_while(|&i| {
            seqs.iter()
                .all(|s| s.pieces.get(i) == Some(&first.pieces[i]))
        })
        .count()
}
