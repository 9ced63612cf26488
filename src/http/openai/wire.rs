//! OpenAI's request and response shapes for `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions`, as the `openai` package sends and reads them (only the fields
//! tagllm honours; see `checked_body` for the rest).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A string, or a list of them (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// What both completion routes share.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct Sampling {
    /// Tokens to generate at most. Completions: default 16 (as OpenAI's); chat: default
    /// the server's `max_new_tokens` limit, at most half the model's context.
    pub max_tokens: Option<usize>,
    /// Default 1 (as OpenAI's); 0 decodes greedily.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Choices per prompt (each sampled with seed `seed + i`). Default 1.
    pub n: Option<usize>,
    /// Up to 4 strings; generation stops before any of them.
    pub stop: Option<OneOrMany>,
    /// Default 0: the same request gives the same answer.
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// tagllm's extension, with a tag as `model`: domain tags to put in place of those
    /// its template names, e.g. `{"source": "IT", "target": "FR"}` (a template with two
    /// domain tags: the first and the second) or `{"EN": "IT"}` (by name).
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// A last chunk, before `[DONE]`, carries `usage` (and no choices).
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"model": "Translate", "prompt": "Save the changes", "max_tokens": 16, "temperature": 0}))]
pub struct CompletionRequest {
    /// The base model's id, or a generation tag's name (`GET /v1/models`).
    pub model: String,
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"model": "Translate", "messages": [{"role": "user", "content": "Save the changes"}],
    "max_tokens": 16, "temperature": 0, "tags": {"source": "EN", "target": "FR"}}))]
pub struct ChatRequest {
    /// The base model's id, or a generation tag's name (`GET /v1/models`).
    pub model: String,
    /// With the base model, rendered with its chat template; with a tag, the last user
    /// message fills the tag template's text slot.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer` (read as `system`), `user` or `assistant`.
    pub role: String,
    /// Text, or a list of `{"type": "text", "text": ...}` parts.
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `text`.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// Always null: log-probabilities are not returned.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    /// `stop` (an end token or stop string), `length` (`max_tokens`); null in a stream's
    /// chunks until the last for the choice.
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    /// In a stream, only in the last chunk, and only with `stream_options.include_usage`.
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: CompletionUsage,
}

/// What a chunk adds to a choice's message.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    /// `assistant`, in a choice's first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    pub finish_reason: Option<String>,
}

/// One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChunkChoice>,
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    /// What to send as `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds: when this server started (the base model), or the tag's bundle was
    /// written.
    pub created: u64,
    pub owned_by: String,
    /// The base model every entry runs on.
    pub root: String,
    /// A tag's base model; null for the base model itself.
    pub parent: Option<String>,
    /// Prompt plus generated tokens at most.
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<Model>,
}

/// The error shape of the `/v1` routes (OpenAI's).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiError,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiError {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, where one is.
    pub param: Option<String>,
    /// tagllm's `error_type` (`validation`, `overloaded`, ...), or `model_not_found`.
    pub code: Option<String>,
}
