//! The learned tags as bundles: vectors, head, manifest, metrics and provenance.

use std::collections::HashMap;

use anyhow::Result;

use super::job::Target;
use super::trainer::Trainer;
use crate::tags::{HeadSpec, TagBundle, TagKind, TagManifest, Template};

impl Trainer<'_> {
    /// The learned tags as bundles, with the metrics and how they were made.
    pub(super) fn bundles(
        &self,
        eval: &serde_json::Value,
        best_step: usize,
        steps_run: usize,
    ) -> Result<Vec<TagBundle>> {
        let d = self.model.config().hidden_size;
        let template = Template::parse(&self.job.template);
        let head_spec = match &self.target {
            Target::Regression { mean, std, range } => Some(HeadSpec::Regression {
                target_mean: *mean,
                target_std: *std,
                range: *range,
            }),
            Target::Classification { labels } => Some(HeadSpec::Classification {
                labels: labels.clone(),
            }),
            _ => None,
        };
        let frozen_tags: HashMap<String, u64> = template
            .tags()
            .iter()
            .filter(|t| !self.learned.contains_key(**t))
            .map(|t| (t.to_string(), self.frozen.get(t).map_or(0, |b| b.version())))
            .collect();
        self.learned
            .iter()
            .map(|(name, var)| {
                let version = self.frozen.get(name).map_or(1, |b| b.version() + 1);
                let is_function = self.job.stage > 1;
                let head = match (&self.head, &head_spec) {
                    (Some(h), Some(spec)) => Some(h.to_head(spec, self.head_positions())?),
                    _ => None,
                };
                Ok(TagBundle {
                    manifest: TagManifest {
                        name: name.clone(),
                        kind: if is_function {
                            TagKind::Function
                        } else {
                            TagKind::Domain
                        },
                        version,
                        num_vectors: var.as_tensor().dim(0)?,
                        hidden_size: d,
                        base_model: self.model.fingerprint.clone(),
                        head_positions: match head_spec {
                            Some(_) => self.head_positions(),
                            None => 1,
                        },
                        head_hidden: match head_spec {
                            Some(_) => self.job.hyperparameters.head_hidden,
                            None => 0,
                        },
                        head: head_spec.clone(),
                        template: is_function.then(|| self.job.template.clone()),
                        domain_tags: template
                            .tags()
                            .iter()
                            .filter(|t| *t != name)
                            .map(|t| t.to_string())
                            .collect(),
                        tensors_sha256: None,
                        provenance: serde_json::json!({
                            "stage": self.job.stage,
                            "template": self.job.template,
                            "target": self.job.target,
                            "head": self.job.head,
                            "hyperparameters": self.job.hyperparameters,
                            "head_fit": self.head_fit,
                            "head_refit": self.head_refit,
                            "sweep": self.sweep_record,
                            "train_examples": self.train.len(),
                            "eval_examples": self.eval.len(),
                            "total_steps": self.total_steps,
                            "steps_run": steps_run,
                            "best_step": best_step,
                            "frozen_tags": frozen_tags,
                        }),
                        metrics: eval.clone(),
                    },
                    vectors: var.as_tensor().copy()?,
                    head,
                    source: "bundle",
                })
            })
            .collect()
    }
}
