//! What a prediction asks for: `/predict`'s request and response on the wire, and the
//! checked request ([`Request`]) that every entry point (`/predict`, the OpenAI-compatible
//! routes) hands the predictor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{invalid, Input, PredictError, Prediction};
use crate::tags::Template;

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    /// Tokens to generate at most (no-head predictions). Default 32.
    pub max_new_tokens: Option<usize>,
    /// 0 (default) decodes greedily.
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold in (0, 1].
    pub top_p: Option<f64>,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Generation stops when the text contains one of these (cut from the text).
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A prediction request: exactly one of `function`, `functions` or `template` (none, or
/// two, is a 422 `validation` error).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"template": "{x}", "inputs": ["the cat"],
    "parameters": {"max_new_tokens": 4}}))]
pub struct PredictRequest {
    /// A function tag: its manifest's template, slots and head.
    pub function: Option<String>,
    /// Several function tags over the same inputs; their common prefix is computed once.
    #[schema(value_type = Option<std::collections::BTreeSet<String>>, min_items = 1)]
    pub functions: Option<Vec<String>>,
    /// Any composition of registered tags, `<Tag>`, with input slots `{slot}`.
    pub template: Option<String>,
    /// One per example: an object of slot values, or a bare string for one slot.
    #[schema(min_items = 1)]
    pub inputs: Vec<Input>,
    #[serde(default, deserialize_with = "crate::json_object::object")]
    pub parameters: Parameters,
    /// Stream the generated text as server-sent events (`text/event-stream`): `token`
    /// events carry pieces of text as they are decoded, then one `done` event carries the
    /// whole answer (as without streaming), or an `error` event. Needs one input and a
    /// template or function that generates text.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PredictionEntry {
    Single(Prediction),
    /// With `functions`: one prediction per function tag.
    PerFunction(BTreeMap<String, Prediction>),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictResponse {
    pub predictions: Vec<PredictionEntry>,
    /// Versions of every tag used.
    pub tags: BTreeMap<String, u64>,
    pub usage: Usage,
}
/// Tokens a request read and wrote, as OpenAI's `usage` counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Prompt tokens over every sequence (tags' vectors count one each).
    pub prompt_tokens: usize,
    /// Tokens generated (0 for head predictions).
    pub completion_tokens: usize,
}

/// What to run each input through.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A function tag's manifest template; `domains` replaces domain tags the template
    /// names (`EN` -> `IT`), so one translation tag serves every language pair.
    Function {
        name: String,
        domains: BTreeMap<String, String>,
    },
    /// Several function tags over the same inputs, in order, no two alike.
    Functions(Vec<String>),
    /// A composition of registered tags with input slots, or plain text for the base model.
    Template(Template),
}

/// A request whose shape is checked (not yet its tags, inputs or parameters).
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    pub inputs: Vec<Input>,
    pub parameters: Parameters,
    pub stream: bool,
}

impl Request {
    /// The function tags it names, in order (none for a template).
    pub fn function_names(&self) -> Vec<&str> {
        match &self.prompt {
            Prompt::Function { name, .. } => vec![name.as_str()],
            Prompt::Functions(names) => names.iter().map(String::as_str).collect(),
            Prompt::Template(_) => Vec::new(),
        }
    }
}

impl TryFrom<PredictRequest> for Request {
    type Error = PredictError;

    fn try_from(req: PredictRequest) -> Result<Self, PredictError> {
        let prompt = match (req.function, req.functions, req.template) {
            (Some(name), None, None) => Prompt::Function {
                name,
                domains: BTreeMap::new(),
            },
            (None, Some(names), None) => {
                if names.is_empty() {
                    return Err(invalid("functions must not be empty"));
                }
                // Results are keyed by name: a repeat would silently fold into one.
                if let Some(dup) = names
                    .iter()
                    .enumerate()
                    .find(|(i, f)| names[..*i].contains(f))
                {
                    return Err(invalid(format!("functions names `{}` twice", dup.1)));
                }
                Prompt::Functions(names)
            }
            (None, None, Some(t)) => {
                crate::tags::template::check_size(&t).map_err(invalid)?;
                Prompt::Template(Template::parse(&t))
            }
            _ => {
                return Err(invalid(
                    "give exactly one of `function`, `functions` or `template`",
                ))
            }
        };
        Ok(Request {
            prompt,
            inputs: req.inputs,
            parameters: req.parameters,
            stream: req.stream,
        })
    }
}
