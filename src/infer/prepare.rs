//! A request checked and composed: its parameters, each function's template (domain tags
//! replaced as asked), every input composed with it, within the limits and the context.

use std::collections::BTreeMap;

use super::metrics::Observed;
use super::request::{Parameters, Prompt, Request};
use super::{
    compose, invalid, scheduler, Answer, ComposeError, Group, Input, PredictError, Predictor,
    Prepared,
};
use crate::model::GenerationParams;
use crate::tags::{TagKind, Template};

/// A function's template and the tag whose head it reads (none: generation).
type Plan = (Template, Option<String>);

impl Predictor {
    fn generation_params(&self, p: &Parameters) -> Result<GenerationParams, PredictError> {
        let max_new_tokens = p.max_new_tokens.unwrap_or(32);
        if max_new_tokens == 0 || max_new_tokens > self.limits.max_new_tokens {
            return Err(invalid(format!(
                "parameters.max_new_tokens must be in 1..={}",
                self.limits.max_new_tokens
            )));
        }
        if let Some(t) = p.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(invalid(
                    "parameters.temperature must be a finite number >= 0",
                ));
            }
        }
        if let Some(tp) = p.top_p {
            if !(tp > 0.0 && tp <= 1.0) {
                return Err(invalid("parameters.top_p must be in (0, 1]"));
            }
        }
        if p.stop.iter().any(String::is_empty) {
            return Err(invalid("parameters.stop must not contain empty strings"));
        }
        Ok(GenerationParams {
            max_new_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed.unwrap_or(0),
            stop: p.stop.clone(),
        })
    }

    /// Checks the request and composes every input with every function's template.
    pub(super) fn prepare(
        &self,
        req: &Request,
        observed: Observed,
    ) -> Result<Prepared, PredictError> {
        let params = self.generation_params(&req.parameters)?;
        let tags = self.registry.snapshot();
        // Positions past the model's context have no rotary embedding: a longer sequence
        // is the client's to shorten (422), never the model's to fail on (500).
        let context = self.model.config().max_position_embeddings;
        let max_prompt = self.limits.max_input_tokens.min(context);
        // (template, head tag) per function in the request.
        let no_domains = BTreeMap::new();
        let (plans, names): (Vec<Plan>, Option<Vec<String>>) = match &req.prompt {
            Prompt::Function { name, domains } => {
                (vec![function_plan(&tags, name, domains)?], None)
            }
            Prompt::Functions(fs) => {
                let plans = fs
                    .iter()
                    .map(|f| function_plan(&tags, f, &no_domains))
                    .collect::<Result<_, _>>()?;
                (plans, Some(fs.clone()))
            }
            Prompt::Template(t) => (vec![(t.clone(), None)], None),
        };
        // Normalisation may shrink text (NFKC of a ligature), hence the margin of 4.
        let max_input_bytes = 4 * max_prompt * self.max_token_bytes;
        for (i, input) in req.inputs.iter().enumerate() {
            let bytes = match input {
                Input::Text(t) => t.len(),
                Input::Slots(slots) => slots.values().map(String::len).sum(),
            };
            if bytes > max_input_bytes {
                return Err(invalid(format!(
                    "inputs[{i}]: {bytes} bytes of text cannot fit the {max_prompt} tokens \
                     a prompt may hold: shorten the input"
                )));
            }
        }
        let mut versions = BTreeMap::new();
        let mut groups = Vec::with_capacity(req.inputs.len());
        let mut prompt_tokens = vec![0; plans.len()];
        for (i, input) in req.inputs.iter().enumerate() {
            let mut seqs = Vec::with_capacity(plans.len());
            for ((tpl, head), tokens) in plans.iter().zip(&mut prompt_tokens) {
                let c = compose(&self.model, &tags, tpl, input, head.as_deref(), max_prompt)
                    .map_err(|e| match e {
                        ComposeError::UnknownTag(_) => invalid(e.to_string()),
                        _ => invalid(format!("inputs[{i}]: {e}")),
                    })?;
                // Prompts are within the context already: only a generation can outgrow it.
                if scheduler::sequence_tokens(&c, &params) > context {
                    return Err(invalid(format!(
                        "inputs[{i}]: its prompt of {} tokens plus max_new_tokens {} \
                         exceeds the model's context of {context} tokens: lower \
                         parameters.max_new_tokens or shorten the input",
                        c.len(),
                        params.max_new_tokens
                    )));
                }
                versions.extend(c.versions.clone());
                *tokens += c.len();
                seqs.push(c);
            }
            groups.push(Group { seqs });
        }
        let generation_tokens: usize = groups
            .iter()
            .flat_map(|g| &g.seqs)
            .filter(|c| c.head.is_none())
            .map(|c| scheduler::sequence_tokens(c, &params))
            .sum();
        if generation_tokens > self.limits.max_generation_tokens {
            return Err(invalid(format!(
                "the generations of this request would hold {generation_tokens} tokens \
                 (prompts + max_new_tokens); the limit is {}: send fewer or shorter inputs",
                self.limits.max_generation_tokens
            )));
        }
        let one_generation =
            matches!(&groups[..], [g] if matches!(&g.seqs[..], [c] if c.head.is_none()));
        if req.stream && !one_generation {
            return Err(invalid(
                "stream: true needs one input and a template or function that generates \
                 text (no head)",
            ));
        }
        Ok(Prepared {
            groups,
            params,
            answer: Answer {
                names,
                versions,
                prompt_tokens,
                observed,
            },
        })
    }
}

/// A function tag's template (its domain tags replaced as `domains` says) and the tag
/// whose head it reads.
fn function_plan(
    tags: &crate::tags::TagSet,
    name: &str,
    domains: &BTreeMap<String, String>,
) -> Result<Plan, PredictError> {
    let bundle = tags
        .get(name)
        .ok_or_else(|| invalid(format!("unknown tag <{name}>")))?;
    if bundle.manifest.kind != TagKind::Function {
        return Err(invalid(format!(
            "<{name}> is a domain tag, not a function tag"
        )));
    }
    let source = bundle.manifest.template.as_deref().ok_or_else(|| {
        invalid(format!(
            "<{name}> has no default template; send `template` instead"
        ))
    })?;
    let mut template = Template::parse(source);
    for (from, to) in domains {
        if from == name || !template.replace_tag(from, to) {
            return Err(invalid(format!(
                "<{name}>'s template `{source}` names no domain tag <{from}> to replace"
            )));
        }
        match tags.get(to) {
            Some(b) if b.manifest.kind == TagKind::Domain => {}
            Some(_) => return Err(invalid(format!("<{to}> is not a domain tag"))),
            None => return Err(invalid(format!("unknown tag <{to}>"))),
        }
    }
    Ok((template, Some(name.to_string())))
}
