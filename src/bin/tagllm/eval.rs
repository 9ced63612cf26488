//! `tagllm eval` and `tagllm embed`: a function tag's metrics on labelled data, and the
//! frozen model's features for a linear probe.

use std::path::PathBuf;

use anyhow::Result;

use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct EvalCmd {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
    pub(crate) tags_dir: PathBuf,
    /// A function tag with a head.
    #[arg(long)]
    pub(crate) function: String,
    /// Labelled JSONL: the template's slots and the target field.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// The labelled field (default: the target the tag was trained on).
    #[arg(long)]
    pub(crate) target: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct EmbedCmd {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
    pub(crate) tags_dir: PathBuf,
    /// e.g. `The molecule {smiles} has druglikeness` (tags allowed).
    #[arg(long)]
    pub(crate) template: String,
    /// JSONL with the template's slots.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// How many final positions to read, concatenated (e.g. a function tag's p rows).
    #[arg(long, default_value_t = 1)]
    pub(crate) positions: usize,
}

pub(crate) fn eval(cmd: EvalCmd) -> Result<()> {
    use tagllm::infer::Prediction;
    use tagllm::tags::{HeadSpec, Template};
    let (m, set) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let tag = set.get(&cmd.function).ok_or_else(|| {
        anyhow::anyhow!("no tag <{}> in {}", cmd.function, cmd.tags_dir.display())
    })?;
    let head = tag
        .head
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("<{}> has no head to evaluate", cmd.function))?;
    let template = Template::parse(
        tag.manifest
            .template
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("<{}> has no template", cmd.function))?,
    );
    let target = cmd
        .target
        .clone()
        .or_else(|| {
            tag.manifest
                .provenance
                .get("target")
                .and_then(|t| t.as_str())
                .map(String::from)
        })
        .ok_or_else(|| anyhow::anyhow!("say which field holds the labels: --target"))?;
    let data = tagllm::train::Dataset::from_jsonl(&std::fs::read_to_string(&cmd.data)?)?;
    data.require_fields(&[target.as_str()])?;
    let preds = in_batches(&m, &set, &template, &data, Some(&cmd.function), |seqs| {
        tagllm::infer::heads::padded_heads(&m, seqs)
    })?;
    let metrics = match &head.spec {
        HeadSpec::Regression { .. } => {
            let want = data.numeric(&target)?;
            let got: Vec<f64> = preds
                .iter()
                .map(|p| {
                    if let Prediction::Value { value } = p {
                        *value
                    } else {
                        f64::NAN
                    }
                })
                .collect();
            serde_json::to_value(tagllm::train::metrics::regression(&got, &want))?
        }
        HeadSpec::Classification { .. } => {
            let right = preds
                .iter()
                .zip(&data.records)
                .filter(
                    |(p, r)| matches!(p, Prediction::Class { label, .. } if *label == r[&target]),
                )
                .count();
            serde_json::json!({"accuracy": right as f64 / data.records.len() as f64, "n": data.records.len()})
        }
    };
    println!(
        "{}",
        serde_json::json!({"tag": cmd.function, "version": tag.version(), "metrics": metrics})
    );
    Ok(())
}

pub(crate) fn embed(cmd: EmbedCmd) -> Result<()> {
    use std::io::Write;
    let (m, set) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let template = tagllm::tags::Template::parse(&cmd.template);
    let data = tagllm::train::Dataset::from_jsonl(&std::fs::read_to_string(&cmd.data)?)?;
    data.require_fields(&template.slots())?;
    let rows = in_batches(&m, &set, &template, &data, None, |seqs| {
        tagllm::infer::heads::padded_last_hidden(&m, seqs, cmd.positions)
    })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for row in rows {
        writeln!(out, "{}", serde_json::to_string(&row)?)?;
    }
    Ok(())
}

/// The model and the tags in `tags_dir`: what `train`, `eval` and `embed` start from.
pub(crate) fn model_and_tags(
    model: &ModelArgs,
    tags_dir: &std::path::Path,
) -> Result<(
    tagllm::model::BaseModel,
    std::sync::Arc<tagllm::tags::TagSet>,
)> {
    let m = model.load()?;
    let identity = tagllm::tags::BaseModelIdentity::of(&m);
    let registry = tagllm::tags::Registry::open(tags_dir, identity, m.device().clone())?;
    let tags = registry.snapshot();
    Ok((m, tags))
}

/// Composes every record with `template` and runs `forward` on batches of 16.
pub(crate) fn in_batches<T>(
    m: &tagllm::model::BaseModel,
    set: &tagllm::tags::TagSet,
    template: &tagllm::tags::Template,
    data: &tagllm::train::Dataset,
    function: Option<&str>,
    forward: impl Fn(&[&tagllm::infer::Composed]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let slots = template.slots();
    let mut out = Vec::with_capacity(data.records.len());
    for chunk in data.records.chunks(16) {
        let composed = chunk
            .iter()
            .map(|r| {
                let input = tagllm::train::data::slot_input(r, &slots);
                let max = m.config().max_position_embeddings;
                tagllm::infer::compose(m, set, template, &input, function, max)
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        out.extend(forward(&composed.iter().collect::<Vec<_>>())?);
    }
    Ok(out)
}
