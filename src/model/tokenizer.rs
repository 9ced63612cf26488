//! Text <-> token ids, built either from GGUF metadata or from an HF `tokenizer.json`.
//!
//! GGUF carries the vocabulary, merges and a pre-tokenizer *name*; we rebuild the matching
//! HF tokenizer. For `smollm` that is: every digit split off on its own, then the GPT-2
//! regex, byte-level (candle's `TokenizerFromGguf` gets this one wrong).

mod chat;

pub use chat::ChatPiece;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// A piece of trusted text: plain text, or one special token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

/// GGUF `token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: llama3's, with every digit on its own.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// `inner` with special-token strings read as plain text: what untrusted text (a
    /// request's slot values, a training target) is tokenised with, so `<|im_end|>` typed
    /// by a client never becomes the control token.
    plain: Tokenizer,
    /// Special tokens (content, id), longest first, for splitting trusted template text.
    specials: Vec<(String, u32)>,
    /// The special tokens a generation never samples: all but the EOS.
    never_generated: Vec<u32>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn md<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata has no `{key}`"))
}

fn md_u32(metadata: &HashMap<String, Value>, key: &str) -> Option<u32> {
    metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    Ok(match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
        "gpt2" | "default" => byte_level(true).into(),
        "llama-bpe" | "llama3" | "qwen2" => {
            let pattern = if pre == "qwen2" {
                QWEN2_PATTERN
            } else {
                LLAMA3_PATTERN
            };
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("{pre} split pattern: {e}"))?;
            Sequence::new(vec![split.into(), byte_level(false).into()]).into()
        }
        other => bail!(
            "GGUF pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, default, \
             llama-bpe, qwen2); load the model from an HF directory with tokenizer.json instead"
        ),
    })
}

impl TextTokenizer {
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = md(metadata, "tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" {
            bail!(
                "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`); \
                 load the model from an HF directory with tokenizer.json instead"
            );
        }
        let pre = metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());
        let tokens: Vec<String> = md(metadata, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let merges: Vec<(String, String)> = md(metadata, "tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::Msg(format!("malformed merge `{m}`")))
            })
            .collect::<candle_core::Result<_>>()?;
        let token_types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("building BPE from GGUF: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (tok, ty) in tokens.iter().zip(&token_types) {
            match *ty {
                TOKEN_TYPE_CONTROL => special.push(AddedToken::from(tok.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(tok.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let bos_id = md_u32(metadata, "tokenizer.ggml.bos_token_id");
        let eos_ids = md_u32(metadata, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        let add_bos = metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let chat_template = metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        Ok(Self::assemble(
            inner,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
        ))
    }

    /// From an HF model directory: `tokenizer.json`, plus `tokenizer_config.json` (BOS/EOS,
    /// chat template) and the ids of `config.json` where present.
    pub fn from_hf_dir(dir: &Path, config_eos: Vec<u32>, config_bos: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            Tokenizer::from_file(&path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            serde_json::from_slice(&std::fs::read(&cfg_path)?)
                .with_context(|| format!("parsing {}", cfg_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let token_id = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let bos_id = config_bos.or_else(|| token_id("bos_token"));
        let mut eos_ids = config_eos;
        if eos_ids.is_empty() {
            eos_ids.extend(token_id("eos_token"));
        }
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = cfg
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Self::assemble(
            inner,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
        ))
    }

    fn assemble(
        inner: Tokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let never_generated = specials
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| !eos_ids.contains(id))
            .collect();
        Self {
            inner,
            plain,
            specials,
            never_generated,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
        }
    }

    /// Token ids of `text`. Special-token strings inside the text (`<|im_start|>`) become
    /// their ids; a BOS is prepended only where the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of a piece of text that sits *inside* a larger sequence: never a BOS, and
    /// special-token strings in it are plain text (see [`Self::split_specials`] for
    /// trusted text that may hold them).
    pub fn encode_fragment(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Trusted text (a template's own words) cut at its special-token strings: the text
    /// between them, and each special token's id, in order.
    pub fn split_specials<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let hit = self
                .specials
                .iter()
                .find(|(s, _)| text[i..].starts_with(s.as_str()));
            match hit {
                Some((s, id)) => {
                    if start < i {
                        out.push(Fragment::Text(&text[start..i]));
                    }
                    out.push(Fragment::Special(*id));
                    i += s.len();
                    start = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            out.push(Fragment::Text(&text[start..]));
        }
        out
    }

    /// Ids of the special tokens (those that end a sequence or mark structure).
    pub fn special_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.specials.iter().map(|(_, id)| *id)
    }

    /// The special tokens other than an EOS: a generation never samples these.
    pub fn never_generated(&self) -> &[u32] {
        &self.never_generated
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The byte-level token strings of `ids` (e.g. `ĠParis`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Makes the special token `text` end generation too (a family whose files name one
    /// EOS but whose generation config stops at several); unknown text changes nothing.
    pub(crate) fn add_eos(&mut self, text: &str) {
        let Some(id) = self
            .specials
            .iter()
            .find(|(t, _)| t == text)
            .map(|(_, id)| *id)
        else {
            return;
        };
        if !self.eos_ids.contains(&id) {
            self.eos_ids.push(id);
            self.never_generated.retain(|&n| n != id);
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The HF tokenizer, e.g. to save it as `tokenizer.json`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
