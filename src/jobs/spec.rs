//! The `POST /train` request and the normalised spec a worker runs.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::json_object::{object, optional_object};
use crate::train::{HeadKind, Hyperparameters, TrainJob};

/// Where training data comes from.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum DatasetRef {
    /// A dataset uploaded with `POST /datasets`.
    Id { id: String },
    /// A JSONL file under the server's data root.
    Path { path: String },
    /// Records given inline.
    Records {
        #[schema(value_type = Vec<Object>)]
        records: Vec<serde_json::Value>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"stage": 1, "tag": "Lang",
    "dataset": {"records": [{"text": "the cat sat on the mat"}, {"text": "CCO and c1ccccc1"}]},
    "hyperparameters": {"steps": 2, "batch_size": 2}}))]
pub struct TrainRequest {
    /// 1: domain tags on unlabelled text; 2: a single-domain function tag; 3: a
    /// cross-domain or multi-task function tag.
    pub stage: u8,
    /// The tag to learn.
    pub tag: Option<String>,
    /// Several domain tags learned together (stage 1).
    pub tags: Option<Vec<String>>,
    /// Default: `<TAG>{text}` for stage 1.
    pub template: Option<String>,
    /// The labelled field (stages 2 and 3).
    pub target: Option<String>,
    /// The head a function tag learns (default none: generation).
    #[serde(default = "no_head")]
    pub head: HeadKind,
    /// A regression target's range, `[lo, hi]` (QED: `[0, 1]`): the head's answers are kept
    /// within it, and every training and held-out value must lie in it.
    #[serde(default)]
    #[schema(min_items = 2, max_items = 2)]
    pub target_range: Option<[f64; 2]>,
    #[serde(deserialize_with = "object")]
    pub dataset: DatasetRef,
    #[serde(default, deserialize_with = "optional_object")]
    pub eval_dataset: Option<DatasetRef>,
    #[serde(default, deserialize_with = "object")]
    pub hyperparameters: Hyperparameters,
}

fn no_head() -> HeadKind {
    HeadKind::None
}

/// What the store keeps and a worker runs: the job with datasets resolved to stored ids.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct JobSpec {
    pub job: TrainJob,
    pub dataset: String,
    pub eval_dataset: Option<String>,
}

impl TrainRequest {
    pub fn to_job(&self) -> Result<TrainJob, String> {
        let tags = match (&self.tag, &self.tags) {
            (Some(t), None) => vec![t.clone()],
            (None, Some(ts)) if !ts.is_empty() => ts.clone(),
            _ => return Err("give `tag` (or, for stage 1, `tags`)".into()),
        };
        let template = match (&self.template, self.stage) {
            (Some(t), _) => t.clone(),
            (None, 1) => tags.iter().map(|t| format!("<{t}>")).collect::<String>() + "{text}",
            (None, _) => return Err("stages 2 and 3 need a `template`".into()),
        };
        Ok(TrainJob {
            stage: self.stage,
            tags,
            template,
            target: self.target.clone(),
            head: self.head,
            target_range: self.target_range,
            hyperparameters: self.hyperparameters.clone(),
        })
    }
}
