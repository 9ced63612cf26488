//! What a `/v1` request's `model` and messages become: the base model or a generation
//! tag, the tag's domain tags as `tags` chooses, and the base model's chat prompt.

use std::collections::BTreeMap;

use super::errors::V1Error;
use super::wire::{ChatMessage, MessageContent, Sampling};
use crate::infer::{Input, Predictor, Prompt};
use crate::model::ChatPiece;
use crate::tags::{Segment, TagBundle, TagKind, Template};

/// What `model` names.
pub(super) enum Target {
    Base,
    /// A function tag that generates text.
    Tag(String),
}

/// The base model's id on these routes: its catalogue name (`smollm2-135m`), or its
/// file's stem. Its GGUF name (`general.name`) is taken as `model` too.
pub(super) fn base_id(p: &Predictor) -> String {
    crate::model::catalogue::short_name(&p.model.path)
}

/// A tag that generates text: a function tag with a template and no head.
fn generates_text(b: &TagBundle) -> bool {
    b.manifest.kind == TagKind::Function
        && b.manifest.head.is_none()
        && b.manifest.template.is_some()
}

pub(super) fn resolve(p: &Predictor, model: &str) -> Result<Target, V1Error> {
    if model == base_id(p) || model == p.model.name {
        return Ok(Target::Base);
    }
    let tags = p.registry.snapshot();
    let Some(b) = tags.get(model) else {
        return Err(V1Error::model_not_found(model));
    };
    if generates_text(b) {
        return Ok(Target::Tag(model.to_string()));
    }
    match (&b.manifest.head, b.manifest.kind, &b.manifest.template) {
        (Some(head), TagKind::Function, Some(_)) => Err(V1Error::invalid(
            "model",
            format!(
                "<{model}> answers with a {} head, not text: use POST /predict",
                head.kind_name()
            ),
        )),
        _ => Err(V1Error::model_not_found(model)),
    }
}

/// The generation tags' names.
pub(super) fn generation_tags(p: &Predictor) -> Vec<String> {
    let tags = p.registry.snapshot();
    tags.tags
        .values()
        .filter(|b| generates_text(b))
        .map(|b| b.name().to_string())
        .collect()
}

/// `tags` of a request with tag `name` as its model: the replacements of the domain tags
/// its template names, by name or (two of them) as `source` and `target`.
pub(super) fn domain_choices(
    p: &Predictor,
    name: &str,
    asked: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, V1Error> {
    let tags = p.registry.snapshot();
    let template = tags
        .get(name)
        .and_then(|b| b.manifest.template.clone())
        .unwrap_or_default();
    let mut named: Vec<String> = Vec::new();
    for t in Template::parse(&template).tags() {
        let is_domain = tags
            .get(t)
            .is_some_and(|b| b.manifest.kind == TagKind::Domain);
        if is_domain && !named.iter().any(|n| n == t) {
            named.push(t.to_string());
        }
    }
    let mut out = BTreeMap::new();
    for (key, to) in asked {
        let from = match key.as_str() {
            "source" | "target" if named.len() == 2 => named[usize::from(key == "target")].clone(),
            _ if named.contains(key) => key.clone(),
            _ => {
                return Err(V1Error::invalid(
                    "tags",
                    format!(
                        "<{name}>'s template names the domain tags {named:?}: `tags` keys are \
                         those names{}, not `{key}`",
                        if named.len() == 2 {
                            " or `source` / `target`"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        };
        if !tags
            .get(to)
            .is_some_and(|b| b.manifest.kind == TagKind::Domain)
        {
            return Err(V1Error::invalid(
                "tags",
                format!("`tags`: <{to}> is not a served domain tag (GET /tags lists them)"),
            ));
        }
        if out.insert(from.clone(), to.clone()).is_some() {
            return Err(V1Error::invalid(
                "tags",
                format!("`tags` replaces <{from}> twice"),
            ));
        }
    }
    Ok(out)
}

/// The messages as (role, text); `developer` is read as `system`.
pub(super) fn chat_messages(
    messages: &[ChatMessage],
) -> Result<Vec<(&'static str, String)>, V1Error> {
    if messages.is_empty() {
        return Err(V1Error::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(V1Error::invalid(
                        "messages",
                        format!("messages[{i}]: role `{other}` is not supported (system, developer, user, assistant)"),
                    ))
                }
            };
            let text = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(V1Error::invalid(
                                    "messages",
                                    format!("messages[{i}]: content parts of type `{kind}` are not supported (text only)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok((role, text))
        })
        .collect()
}

/// The base model's chat prompt: the template's own text as it is, each message's content
/// in a slot of its own (plain text: it cannot forge a turn).
pub(super) fn chat_prompt(pieces: Vec<ChatPiece>, messages: &[(&str, String)]) -> (Prompt, Input) {
    let slot = |i: usize| format!("m{i}");
    let segments = pieces
        .into_iter()
        .map(|piece| match piece {
            ChatPiece::Text(t) => Segment::Text(t),
            ChatPiece::Message(i) => Segment::Slot(slot(i)),
        })
        .collect();
    let values = messages
        .iter()
        .enumerate()
        .map(|(i, (_, text))| (slot(i), text.clone()))
        .collect();
    (
        Prompt::Template(Template::from_segments(segments)),
        Input::Slots(values),
    )
}

/// The prompt a completion runs: the base model on the text as it is, or the tag's
/// template (its domain tags replaced as `tags` says).
pub(super) fn target_prompt(
    p: &Predictor,
    target: &Target,
    s: &Sampling,
) -> Result<Prompt, V1Error> {
    match target {
        Target::Base => {
            if s.tags.is_some() {
                return Err(V1Error::invalid(
                    "tags",
                    "`tags` chooses a tag template's domain tags: send a tag as `model`",
                ));
            }
            Ok(Prompt::Template(Template::from_segments(vec![
                Segment::Slot("prompt".into()),
            ])))
        }
        Target::Tag(name) => Ok(Prompt::Function {
            name: name.clone(),
            domains: domain_choices(p, name, s.tags.as_ref().unwrap_or(&BTreeMap::new()))?,
        }),
    }
}
