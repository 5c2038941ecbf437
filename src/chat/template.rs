//! A model's chat template: found where transformers finds it, rendered as transformers
//! renders it, tokenized as `apply_chat_template(tokenize=True)` tokenizes it, with the
//! assistant-token mask of `return_assistant_tokens_mask=True`.
//!
//! Where the template comes from, first found wins: `--chat-template FILE`; a GGUF file's
//! `tokenizer.chat_template`; a folder's `chat_template.jinja`, else the `chat_template` of its
//! `tokenizer_config.json` (a string, or a list of named templates of which `default` is
//! taken). A model without one gets [`CHATML`], with a note on stderr.
//!
//! BOS / EOS: the rendered text is tokenized without the tokenizer's own special tokens
//! (transformers passes `add_special_tokens=False`), so a template that writes
//! `{{ bos_token }}` gets exactly one BOS and a template that does not gets none.
use super::jinja::{self, GENERATION_END, GENERATION_START};
use super::message::Message;
use crate::error::{OctetError, Result};
use crate::io::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use minijinja::{Environment, Value};
use std::path::{Path, PathBuf};

/// ChatML, for models that ship no template; its assistant turns are `{% generation %}`
/// blocks (content and `<|im_end|>`), so the assistant mask needs no prefix rendering.
pub const CHATML: &str = "{% for message in messages %}\
{% if message['role'] == 'assistant' %}\
{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}\
{% else %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\
{% endif %}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shown for the built-in template in messages.
const CHATML_ORIGIN: &str = "<built-in ChatML template>";
const TEMPLATE_NAME: &str = "chat";

/// A conversation tokenized for training: the ids and which of them the assistant wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChat {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// `true` for tokens of assistant turns (content and end-of-turn token), as transformers'
    /// `assistant_masks`.
    pub assistant_mask: Vec<bool>,
}

/// A compiled chat template with the tokenizer whose special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: PathBuf,
    has_generation: bool,
    tokenizer: Tokenizer,
    /// `bos_token`, `eos_token`, … as the template sees them.
    specials: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("has_generation", &self.has_generation)
            .finish()
    }
}

impl ChatTemplate {
    /// The template for `model` (a folder or a GGUF file): `override_file` when given, else the
    /// model's own, else [`CHATML`] with a note on stderr.
    pub fn load(model: &Path, override_file: Option<&Path>, tokenizer: Tokenizer) -> Result<Self> {
        if let Some(file) = override_file {
            let source = std::fs::read_to_string(file).map_err(|e| OctetError::io(file, e))?;
            return Self::new(&source, file, tokenizer);
        }
        match model_template(model)? {
            Some((source, origin)) => Self::new(&source, origin, tokenizer),
            None => {
                eprintln!(
                    "note: {} has no chat template; using ChatML (<|im_start|>role … \
                     <|im_end|>); give --chat-template FILE to use another",
                    model.display()
                );
                Self::chatml(tokenizer)
            }
        }
    }

    /// The built-in [`CHATML`] template.
    pub fn chatml(tokenizer: Tokenizer) -> Result<Self> {
        Self::new(CHATML, CHATML_ORIGIN, tokenizer)
    }

    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: &str, origin: impl Into<PathBuf>, tokenizer: Tokenizer) -> Result<Self> {
        let origin = origin.into();
        let has_generation = jinja::has_generation_blocks(source);
        let mut env = jinja::environment();
        env.add_template_owned(TEMPLATE_NAME, jinja::rewrite_generation_blocks(source))
            .map_err(|e| template_error(&origin, &e))?;
        let specials = special_tokens(&tokenizer);
        Ok(Self {
            env,
            origin,
            has_generation,
            tokenizer,
            specials,
        })
    }

    /// Where the template came from (a file, or `<built-in ChatML template>`).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Whether this is the built-in ChatML template.
    pub fn is_builtin_chatml(&self) -> bool {
        self.origin == Path::new(CHATML_ORIGIN)
    }

    /// Whether the template marks assistant text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// The tokenizer the template renders and tokenizes with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The conversation as text, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let (text, _) = self.render_marked(messages, add_generation_prompt)?;
        Ok(text)
    }

    /// Token ids of the conversation, as `apply_chat_template(messages, tokenize=True,
    /// add_generation_prompt=...)` gives them (BOS only where the template writes it).
    pub fn encode(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text)
    }

    /// Token ids and assistant mask of a conversation for training (no generation prompt).
    ///
    /// With `{% generation %}` blocks the mask is transformers'
    /// `return_assistant_tokens_mask=True`: every token overlapping a block's output. Without
    /// them each assistant turn is found by rendering the conversation up to the turn with
    /// `add_generation_prompt=True` and through it without: the turn is what the second adds
    /// to the first (content, end-of-turn token and what the template writes after it), as
    /// TRL does. A template whose renderings of a conversation's beginnings are not
    /// beginnings of its full rendering cannot be split that way and is refused.
    pub fn encode_with_assistant_mask(&self, messages: &[Message]) -> Result<EncodedChat> {
        let (text, spans) = if self.has_generation {
            self.render_marked(messages, false)?
        } else {
            self.render_by_prefixes(messages)?
        };
        let enc = self
            .tokenizer
            .inner()
            .encode_char_offsets(text.as_str(), false)
            .map_err(|e| OctetError::InvalidArgument(format!("tokenization failed: {e}")))?;
        let mut mask = vec![false; enc.get_ids().len()];
        let mut span = 0;
        for (i, &(start, end)) in enc.get_offsets().iter().enumerate() {
            while span < spans.len() && start >= spans[span].1 {
                span += 1;
            }
            if span == spans.len() {
                break;
            }
            mask[i] = end > spans[span].0;
        }
        Ok(EncodedChat {
            ids: enc.get_ids().to_vec(),
            assistant_mask: mask,
        })
    }

    /// The token that ends an assistant turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, …):
    /// the first special token the template writes after an assistant's text. `None` when
    /// it writes none there; callers then stop at the tokenizer's EOS.
    pub fn end_of_turn_id(&self) -> Result<Option<u32>> {
        const PROBE: &str = "octet probe answer";
        let messages = [Message::new("user", "Hi"), Message::new("assistant", PROBE)];
        let text = self.render(&messages, false)?;
        let Some(at) = text.rfind(PROBE) else {
            return Ok(None);
        };
        let after = &text[at + PROBE.len()..];
        let ids = self.tokenizer.encode(after)?;
        let specials = self.tokenizer.inner().get_added_tokens_decoder();
        Ok(ids
            .into_iter()
            .find(|id| specials.get(id).is_some_and(|t| t.special)))
    }

    /// Renders with the generation blocks' output located: the text without the markers and
    /// each block's (start, end) in characters.
    fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let marker = |m: &Message| {
            m.content.contains(GENERATION_START) || m.content.contains(GENERATION_END)
        };
        if messages.iter().any(marker) {
            return Err(OctetError::InvalidArgument(
                "a message holds the Unicode noncharacter U+FDD0 or U+FDD1, which octet uses \
                 to mark assistant text"
                    .into(),
            ));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&self.origin, &e))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(minijinja::value::Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        ctx.extend(
            self.specials
                .iter()
                .map(|(k, v)| (*k, Value::from(v.as_str()))),
        );
        let ctx = Value::from_pairs(ctx);
        let marked = tmpl
            .render(ctx)
            .map_err(|e| template_error(&self.origin, &e))?;
        let mut text = String::with_capacity(marked.len());
        let mut spans = Vec::new();
        let (mut chars, mut open) = (0usize, None);
        for c in marked.chars() {
            match c {
                GENERATION_START => open = Some(chars),
                GENERATION_END => spans.extend(open.take().map(|s| (s, chars))),
                _ => {
                    text.push(c);
                    chars += 1;
                }
            }
        }
        Ok((text, spans))
    }

    /// The full rendering and each assistant turn's character span, by prefix rendering.
    fn render_by_prefixes(&self, messages: &[Message]) -> Result<(String, Vec<(usize, usize)>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(OctetError::bad_file(
                    &self.origin,
                    format!(
                        "cannot find assistant turn {} in the rendered conversation: the \
                         template renders the conversation's beginning differently from the \
                         whole (mark assistant text with {{% generation %}} … \
                         {{% endgeneration %}}, or give another --chat-template)",
                        i + 1
                    ),
                ));
            }
            spans.push((before.chars().count(), through.chars().count()));
        }
        Ok((full, spans))
    }
}

/// The template a model carries, with the file it came from; `None` when it has none.
pub fn model_template(model: &Path) -> Result<Option<(String, PathBuf)>> {
    if crate::io::gguf::is_gguf(model) {
        let file = GgufFile::open(model)?;
        return Ok(file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(|s| (s.to_string(), model.to_path_buf())));
    }
    let jinja_file = model.join("chat_template.jinja");
    if jinja_file.is_file() {
        let s = std::fs::read_to_string(&jinja_file).map_err(|e| OctetError::io(&jinja_file, e))?;
        return Ok(Some((s, jinja_file)));
    }
    let config = model.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&config) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| OctetError::bad_file(&config, format!("invalid JSON: {e}")))?;
    let source = match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                OctetError::bad_file(
                    &config,
                    "chat_template is a list without a template named \"default\"",
                )
            })?,
        Some(_) => {
            return Err(OctetError::bad_file(
                &config,
                "chat_template is neither a string nor a list of named templates",
            ))
        }
    };
    Ok(Some((source, config)))
}

/// The special tokens' texts as transformers passes them to templates (its
/// `special_tokens_map`: only those the tokenizer has).
fn special_tokens(tokenizer: &Tokenizer) -> Vec<(&'static str, String)> {
    let text = |id: Option<u32>| id.and_then(|id| tokenizer.inner().id_to_token(id));
    [
        ("bos_token", text(tokenizer.bos_id())),
        ("eos_token", text(tokenizer.eos_id())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect()
}

/// A template error naming the template and, where minijinja knows it, the template line.
fn template_error(origin: &Path, e: &minijinja::Error) -> OctetError {
    let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
    let what = match e.detail() {
        Some(d) if e.kind() == minijinja::ErrorKind::InvalidOperation => d.to_string(),
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    OctetError::bad_file(origin, format!("chat template{line}: {what}"))
}
