//! What a bundle says of itself (`manifest.json`), and what it must agree with to be
//! served on a base model.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagKind {
    Domain,
    Function,
}

/// What a function tag's head predicts, and how to read its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HeadSpec {
    /// `d -> 1` on standardised targets; predictions are mapped back to original units,
    /// and kept within `range` where the target has one (QED lies in [0, 1]).
    Regression {
        target_mean: f64,
        target_std: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        range: Option<[f64; 2]>,
    },
    /// `d -> k`, one logit per label.
    Classification { labels: Vec<String> },
}

/// A regression head's output `z` (standardised) in the target's units, within its range.
pub fn regression_value(z: f64, mean: f64, std: f64, range: Option<[f64; 2]>) -> f64 {
    let value = z * std + mean;
    match range {
        Some([lo, hi]) => value.clamp(lo, hi),
        None => value,
    }
}

impl HeadSpec {
    /// `regression` or `classification`, as `/tags` and the errors name it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Regression { .. } => "regression",
            Self::Classification { .. } => "classification",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagManifest {
    pub name: String,
    pub kind: TagKind,
    pub version: u64,
    pub num_vectors: usize,
    pub hidden_size: usize,
    /// Fingerprint of the base model's weights the tag was trained on.
    pub base_model: String,
    #[serde(default)]
    pub head: Option<HeadSpec>,
    /// How many of the tag's last positions the head reads, concatenated in order
    /// (`head.weight` is `[k, head_positions * d]`); 1, the default, reads the last only.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub head_positions: usize,
    /// Units of the head's hidden layer (tanh), between what it reads and its output:
    /// `head.hidden.weight` `[head_hidden, head_positions * d]`, then `head.weight`
    /// `[k, head_hidden]`. 0, the default, is the paper's linear head.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub head_hidden: usize,
    /// For function tags: the default template, e.g. `... <SMILES> {smiles} ... <QED>`.
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub domain_tags: Vec<String>,
    /// sha256 of `tag.safetensors`, so a manifest never pairs with other tensors.
    #[serde(default)]
    pub tensors_sha256: Option<String>,
    #[serde(default)]
    pub provenance: serde_json::Value,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What a bundle must agree with to be served with this base model.
#[derive(Debug, Clone)]
pub struct BaseModelIdentity {
    pub fingerprint: String,
    pub hidden_size: usize,
}

impl BaseModelIdentity {
    pub fn of(model: &crate::model::BaseModel) -> Self {
        Self {
            fingerprint: model.fingerprint.clone(),
            hidden_size: model.config().hidden_size,
        }
    }
}
