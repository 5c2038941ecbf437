//! A conversation with a model: every turn renders the whole history through the chat
//! template with the generation prompt, as transformers' chat pipeline does, and the reply is
//! generated through a [`Decoder`] that keeps its KV cache across turns, so a turn computes
//! only what the history does not already hold.
use super::message::Message;
use super::template::ChatTemplate;
use crate::error::{OctetError, Result};
use crate::generate::{Decoder, GenerateOptions};
use crate::model::CausalLm;

/// One generated assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The new ids, the stop id (end of turn or EOS) included when one ended the reply.
    pub ids: Vec<i64>,
    /// The reply's text (the stop id left out), as it enters the history.
    pub text: String,
    /// Whether a stop id ended it (else the length limit or the caller did).
    pub ended_turn: bool,
    /// Tokens of the rendered conversation the reply continued.
    pub prompt_tokens: usize,
    /// Of those, how many the cache already held from earlier turns.
    pub reused_tokens: usize,
    /// Earlier messages dropped from the front of the history so the conversation fits the
    /// model's positions (the system turn is kept).
    pub dropped_messages: usize,
}

/// A multi-turn conversation with one model and its chat template.
pub struct ChatSession<'a> {
    model: &'a dyn CausalLm,
    template: &'a ChatTemplate,
    decoder: Decoder<'a>,
    history: Vec<Message>,
}

impl<'a> ChatSession<'a> {
    /// A new conversation, opened by a system turn when `system` is given.
    pub fn new(
        model: &'a dyn CausalLm,
        template: &'a ChatTemplate,
        system: Option<&str>,
        use_cache: bool,
    ) -> Self {
        let history = system
            .map(|s| vec![Message::new("system", s)])
            .unwrap_or_default();
        ChatSession {
            model,
            template,
            decoder: Decoder::new(model, use_cache, model.info().max_positions),
            history,
        }
    }

    /// Continues an existing conversation (`--messages`): its last message is usually a user
    /// turn the next [`ChatSession::respond`] answers.
    pub fn with_history(mut self, messages: Vec<Message>) -> Self {
        self.history.extend(messages);
        self
    }

    /// The conversation so far.
    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// Forgets every turn but the system turn.
    pub fn reset(&mut self) {
        self.history.retain(|m| m.role == "system");
    }

    /// Adds the user's turn and answers it (see [`ChatSession::respond`]).
    pub fn say(
        &mut self,
        user: &str,
        opts: &GenerateOptions,
        on_token: impl FnMut(i64) -> bool,
    ) -> Result<Reply> {
        self.history.push(Message::new("user", user));
        self.respond(opts, on_token).inspect_err(|_| {
            self.history.pop();
        })
    }

    /// Generates the assistant's turn after the history and appends it. `opts.eos` should hold
    /// the template's end-of-turn id. When the rendered history leaves no room for
    /// `opts.max_new_tokens`, the oldest turns after the system turn are dropped first.
    /// `on_token` sees every new id and returns `false` to stop there.
    pub fn respond(
        &mut self,
        opts: &GenerateOptions,
        on_token: impl FnMut(i64) -> bool,
    ) -> Result<Reply> {
        let (prompt, dropped_messages) = self.fitting_prompt(opts.max_new_tokens)?;
        let ids = self.decoder.generate(&prompt, opts, on_token)?;
        let reused_tokens = self.decoder.reused();
        let ended_turn = ids.last().is_some_and(|t| opts.eos.contains(t));
        let content = if ended_turn {
            &ids[..ids.len() - 1]
        } else {
            &ids[..]
        };
        let content: Vec<u32> = content.iter().map(|&t| t as u32).collect();
        let text = self.template.tokenizer().decode(&content)?;
        self.history.push(Message::new("assistant", text.clone()));
        Ok(Reply {
            ids,
            text,
            ended_turn,
            prompt_tokens: prompt.len(),
            reused_tokens,
            dropped_messages,
        })
    }

    /// The rendered history with the generation prompt, after dropping the oldest turns
    /// (system turn kept) until `max_new_tokens` more fit; and how many were dropped.
    fn fitting_prompt(&mut self, max_new_tokens: usize) -> Result<(Vec<i64>, usize)> {
        let max = self.model.info().max_positions;
        let mut dropped = 0;
        loop {
            let ids = self.template.encode(&self.history, true)?;
            let first = self.history.iter().position(|m| m.role != "system");
            let droppable = first.is_some_and(|f| f + 1 < self.history.len());
            if ids.len() + max_new_tokens <= max || !droppable {
                if ids.len() >= max {
                    return Err(OctetError::InvalidArgument(format!(
                        "the conversation renders to {} tokens but the model takes at most {max} \
                         positions: shorten the message or the system prompt",
                        ids.len()
                    )));
                }
                return Ok((ids.into_iter().map(i64::from).collect(), dropped));
            }
            // Drop through the first assistant reply after the front, so turns go in pairs.
            let f = first.expect("droppable implies a non-system turn");
            let end = self.history[f..]
                .iter()
                .position(|m| m.role == "assistant")
                .map_or(f + 1, |i| f + i + 1)
                .min(self.history.len() - 1);
            dropped += end - f;
            self.history.drain(f..end);
        }
    }
}
