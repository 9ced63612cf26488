//! What a training run is asked to do (`TrainJob`; its `Hyperparameters` are in
//! `hyperparameters.rs`) and the checks that turn a job plus its data into a runnable plan,
//! with errors that name the tag, slot, field or line at fault.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::data::{Dataset, Record};
use super::hyperparameters::{Hyperparameters, TagInit};
use crate::tags::{TagKind, TagSet, Template};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Regression,
    Classification,
    None,
}

/// What to learn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    /// 1: domain tags (next-token prediction); 2: a single-domain function tag;
    /// 3: a cross-domain / multi-task function tag.
    pub stage: u8,
    /// The tags being learned: one or more domain tags (stage 1), one function tag (2, 3).
    pub tags: Vec<String>,
    /// e.g. `<Protein>{text}` (stage 1) or `... <SMILES> {smiles} ... <QED>`.
    pub template: String,
    /// The labelled field (stages 2 and 3).
    pub target: Option<String>,
    pub head: HeadKind,
    /// A regression target's range, `[lo, hi]`: the head's answers are kept within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_range: Option<[f64; 2]>,
    pub hyperparameters: Hyperparameters,
}

/// What a learned tag's output is trained against.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// Next-token prediction on the text after the tag (stage 1).
    Lm,
    /// A regression head on standardised targets, answering within `range` if given.
    Regression {
        mean: f64,
        std: f64,
        range: Option<[f64; 2]>,
    },
    Classification {
        labels: Vec<String>,
    },
    /// No head: the LM head generates the target text.
    Generation,
}

/// A record may carry its own template under this field (multi-task data such as one
/// translation direction per record); the job's template is the default and the one
/// the published tag keeps.
pub const RECORD_TEMPLATE_FIELD: &str = "template";

pub(super) fn record_template<'r>(record: &'r Record, default: &'r str) -> &'r str {
    record
        .get(RECORD_TEMPLATE_FIELD)
        .map_or(default, String::as_str)
}

/// A job checked against the served tags and its data.
pub(super) struct Plan {
    /// Every template the data uses (the job's included), parsed once.
    pub templates: BTreeMap<String, Template>,
    pub target: Target,
}

/// Checks that every record has the slots of its own template (or of the job's).
fn require_slots(
    data: &Dataset,
    templates: &BTreeMap<String, Template>,
    default: &str,
) -> Result<()> {
    for (i, r) in data.records.iter().enumerate() {
        let template = &templates[record_template(r, default)];
        if let Some(missing) = template.slots().into_iter().find(|s| !r.contains_key(*s)) {
            bail!("line {}: missing field `{missing}`", i + 1);
        }
    }
    Ok(())
}

/// Validates `job` against the frozen tags and the data, without touching the model.
pub(super) fn plan(
    job: &TrainJob,
    frozen: &TagSet,
    data: &Dataset,
    eval: Option<&Dataset>,
) -> Result<Plan> {
    ensure!((1..=3).contains(&job.stage), "stage must be 1, 2 or 3");
    job.hyperparameters.validate()?;
    ensure!(!job.tags.is_empty(), "name the tag(s) to learn");
    for t in &job.tags {
        ensure!(
            crate::tags::template::is_valid_tag_name(t),
            "`{t}` is not a valid tag name"
        );
    }
    if let TagInit::Tag(from) = TagInit::parse(&job.hyperparameters.init)? {
        ensure!(
            frozen.get(&from).is_some(),
            "init: no served tag <{from}> to copy"
        );
    }
    // Every template the data uses: the job's, and any a record carries itself.
    let mut texts = vec![job.template.clone()];
    for r in data
        .records
        .iter()
        .chain(eval.iter().flat_map(|e| e.records.iter()))
    {
        if let Some(t) = r.get(RECORD_TEMPLATE_FIELD) {
            if !texts.contains(t) {
                texts.push(t.clone());
            }
        }
    }
    for t in &texts {
        crate::tags::template::check_size(t).map_err(anyhow::Error::msg)?;
    }
    let per_record = texts.len() > 1;
    let templates: BTreeMap<String, Template> = texts
        .iter()
        .map(|t| (t.clone(), Template::parse(t)))
        .collect();
    for text in &texts {
        let which = if per_record {
            format!("template {text:?}")
        } else {
            "the template".to_string()
        };
        check_template(job, frozen, &templates[text], &which)?;
    }
    require_slots(data, &templates, &job.template)?;
    if let Some(e) = eval {
        require_slots(e, &templates, &job.template)?;
    }
    let target = target(job, data)?;
    if let (Target::Regression { range: Some(r), .. }, Some(field)) = (&target, &job.target) {
        for (what, set) in std::iter::once(("training", data)).chain(eval.map(|e| ("held-out", e)))
        {
            check_in_range(&set.numeric(field)?, *r, field, what)?;
        }
    }
    ensure!(
        job.hyperparameters.head_positions == 1
            || matches!(
                target,
                Target::Regression { .. } | Target::Classification { .. }
            ),
        "head_positions needs a regression or classification head"
    );
    ensure!(
        job.hyperparameters.head_hidden == 0
            || matches!(
                target,
                Target::Regression { .. } | Target::Classification { .. }
            ),
        "head_hidden needs a regression or classification head"
    );
    Ok(Plan { templates, target })
}

fn check_template(job: &TrainJob, frozen: &TagSet, template: &Template, which: &str) -> Result<()> {
    for t in &job.tags {
        ensure!(
            template.tags().contains(&t.as_str()),
            "{which} never uses <{t}>"
        );
    }
    for t in template.tags() {
        if !job.tags.iter().any(|l| l == t) {
            let b = frozen.get(t).with_context(|| {
                format!("unknown tag <{t}>: train it first or fix the template")
            })?;
            ensure!(
                b.manifest.kind == TagKind::Domain || job.stage == 3,
                "<{t}> is a function tag; only stage 3 composes with other function tags"
            );
        }
    }
    let slots = template.slots();
    ensure!(!slots.is_empty(), "{which} has no {{slot}} for the data");
    if let Some(field) = job.target.as_deref() {
        ensure!(
            !slots.contains(&field),
            "the target `{field}` must not also be a template slot"
        );
    }
    if job.stage == 2 {
        let domains = template
            .tags()
            .iter()
            .filter(|t| !job.tags.iter().any(|l| l == *t))
            .count();
        ensure!(
            domains <= 1,
            "stage 2 is single-domain: {which} has {domains} other tags (use stage 3)"
        );
    }
    Ok(())
}

/// Every target value lies in the range the head will answer within: a value outside it
/// could never be predicted, so the range or the data is wrong.
fn check_in_range(values: &[f64], [lo, hi]: [f64; 2], field: &str, what: &str) -> Result<()> {
    match values.iter().position(|v| !(lo..=hi).contains(v)) {
        Some(i) => bail!(
            "{what} data line {}: `{field}` is {}, outside target_range [{lo}, {hi}]",
            i + 1,
            values[i]
        ),
        None => Ok(()),
    }
}

fn target(job: &TrainJob, data: &Dataset) -> Result<Target> {
    if let Some([lo, hi]) = job.target_range {
        ensure!(
            job.head == HeadKind::Regression,
            "target_range is for a regression head"
        );
        ensure!(
            lo.is_finite() && hi.is_finite() && lo < hi,
            "target_range must be two finite numbers, the first below the second"
        );
    }
    Ok(match (job.stage, job.head) {
        (1, HeadKind::None) => {
            ensure!(
                job.target.is_none(),
                "stage 1 learns from unlabelled text: no target"
            );
            Target::Lm
        }
        (1, _) => bail!("stage 1 (domain tags) has no head"),
        (_, head) => {
            ensure!(
                job.tags.len() == 1,
                "stages 2 and 3 learn exactly one function tag"
            );
            let field = job
                .target
                .as_deref()
                .context("stages 2 and 3 need `target`: the labelled field")?;
            match head {
                HeadKind::Regression => {
                    let v = data.numeric(field)?;
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
                    Target::Regression {
                        mean,
                        std: var.sqrt().max(1e-8),
                        range: job.target_range,
                    }
                }
                HeadKind::Classification => Target::Classification {
                    labels: data.labels(field)?,
                },
                HeadKind::None => {
                    data.require_fields(&[field])?;
                    Target::Generation
                }
            }
        }
    })
}

/// Checks a job against the served tags and its data without building anything heavy:
/// what `POST /train` needs before it queues a job. Returns the run's optimizer steps.
pub fn check(
    job: &TrainJob,
    frozen: &TagSet,
    data: &Dataset,
    eval: Option<&Dataset>,
) -> Result<usize> {
    plan(job, frozen, data, eval)?;
    Ok(job.hyperparameters.total_steps(data.records.len()))
}

#[cfg(test)]
mod tests;
