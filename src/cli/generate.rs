//! `octet generate`: continue a prompt, or answer a chat (`--chat`, `--messages`), streaming
//! the text to stdout as tokens come.
//!
//! stdout carries exactly the prompt followed by the continuation, or in chat mode the
//! assistant's reply alone (no trailing newline); everything else (seed, notes, tokens/s) goes
//! to stderr.
use anyhow::{bail, Context};
use octet::chat::{ChatSession, ChatTemplate, Message};
use octet::generate::{generate, model_eos_ids, room, GenerateOptions, TextStream};
use octet::model::CausalLm;
use octet::tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_file", "messages"])))]
pub struct Args {
    #[command(flatten)]
    source: super::ModelArgs,
    /// Prompt text (with --chat: the user's message).
    #[arg(long)]
    prompt: Option<String>,
    /// File whose whole contents (trailing newline included) are the prompt.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Render the prompt as a user turn through the model's chat template and print only the
    /// assistant's reply, which ends at the template's end-of-turn token.
    #[arg(long)]
    chat: bool,
    /// A conversation to answer (implies --chat): a JSON list of {"role", "content"}
    /// messages, or an object with such a "messages" list.
    #[arg(long)]
    messages: Option<PathBuf>,
    #[command(flatten)]
    conversation: ChatArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop when the continuation contains this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
}

/// The flags of a conversation, shared by `generate --chat` and `chat`.
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// A system turn opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template (a Jinja file) instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

/// How tokens are chosen, shared by `generate` and `chat`.
#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Most tokens to add (fewer if the model's positions run out).
    #[arg(long, default_value_t = 64, value_parser = super::at_least(1))]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens that reach probability P (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalize tokens already in the sequence (Hugging Face semantics; 1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Sampling seed [default: drawn from the clock and printed on stderr].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep going past end-of-sequence (and end-of-turn) tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Recompute the whole sequence every step instead of keeping a KV cache.
    #[arg(long)]
    pub no_cache: bool,
}

impl SamplingArgs {
    /// The sampling options for `model` (a folder or GGUF at `dir`) and its tokenizer: the
    /// seed (drawn from the clock unless given), the end-of-sequence ids plus `end_of_turn`,
    /// and the vocabulary rows text can decode to. Prints the seed when sampling.
    pub fn options(
        &self,
        dir: &Path,
        model: &dyn CausalLm,
        tok: &Tokenizer,
        end_of_turn: Option<u32>,
    ) -> anyhow::Result<GenerateOptions> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let mut eos = Vec::new();
        if !self.ignore_eos {
            eos = model_eos_ids(dir);
            eos.extend(tok.eos_id().into_iter().chain(end_of_turn).map(i64::from));
            eos.sort_unstable();
            eos.dedup();
        }
        // A model vocabulary padded beyond the tokenizer's has rows no text decodes to.
        let tok_vocab = tok.vocab_size();
        let vocab_limit = (tok_vocab < model.info().vocab_size).then_some(tok_vocab);
        let opts = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed,
            eos,
            use_cache: !self.no_cache,
            vocab_limit,
        };
        opts.validate()?;
        if self.temperature > 0.0 {
            eprintln!("seed {seed}");
        }
        Ok(opts)
    }
}

/// The prompt's text, from `--prompt` or `--prompt-file`.
fn read_prompt(a: &Args) -> anyhow::Result<String> {
    Ok(match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    })
}

/// A `--messages` file: a JSON list of messages, or an object holding one as "messages".
fn read_messages(file: &Path) -> anyhow::Result<Vec<Message>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", file.display()))?;
    let list = match value {
        serde_json::Value::Object(mut o) => o.remove("messages").unwrap_or_default(),
        v => v,
    };
    let messages: Vec<Message> = serde_json::from_value(list).with_context(|| {
        format!(
            "{}: expected a list of {{\"role\", \"content\"}} messages (or an object with one as \"messages\")",
            file.display()
        )
    })?;
    if messages.is_empty() {
        bail!("{}: the conversation has no messages", file.display());
    }
    Ok(messages)
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.source.model = octet::hub::resolve_model(&a.source.model)?;
    let load = a.source.load_options()?;
    let chat = a.chat || a.messages.is_some();
    if !chat && (a.conversation.system.is_some() || a.conversation.chat_template.is_some()) {
        bail!("--system and --chat-template need --chat (or --messages)");
    }
    octet::model::check_model_path(&a.source.model)?;
    let tok = Tokenizer::from_dir(&a.source.model)?;
    let conversation = if chat {
        let template = ChatTemplate::load(
            &a.source.model,
            a.conversation.chat_template.as_deref(),
            tok.clone(),
        )?;
        let mut messages = match &a.messages {
            Some(f) => read_messages(f)?,
            None => vec![Message::new("user", read_prompt(&a)?)],
        };
        if let Some(system) = &a.conversation.system {
            if messages.first().is_some_and(|m| m.role == "system") {
                bail!("--system was given but the conversation already opens with a system turn");
            }
            messages.insert(0, Message::new("system", system.as_str()));
        }
        // Rendering first: a template that raises on these messages fails before loading.
        template.encode(&messages, true)?;
        Some((template, messages))
    } else {
        None
    };
    let m = a.source.load_model(&load)?;
    let model = m.model.as_ref();
    let mut out = std::io::stdout().lock();
    if let Some((template, messages)) = conversation {
        let eot = template.end_of_turn_id()?;
        let opts = a.sampling.options(&a.source.model, model, &tok, eot)?;
        let mut session =
            ChatSession::new(model, &template, None, opts.use_cache).with_history(messages);
        let mut stream = Streamer::new(&tok, &[], &a.stop, &opts.eos, &mut out);
        let reply = session.respond(&opts, |t| stream.push(t));
        let stats = stream.finish()?;
        let reply = reply?;
        stats.report(reply.prompt_tokens, &opts, reply.ended_turn, "end of turn");
        return Ok(());
    }
    let prompt = read_prompt(&a)?;
    let prompt_ids: Vec<u32> = tok.encode_with_bos(&prompt)?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let opts = a.sampling.options(&a.source.model, model, &tok, None)?;
    let budget = room(model, prompt_ids.len(), opts.max_new_tokens)?;
    if budget < opts.max_new_tokens {
        eprintln!(
            "note: {} prompt tokens leave room for {budget} new tokens (the model takes {} positions)",
            prompt_ids.len(),
            model.info().max_positions
        );
    }
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let ids: Vec<i64> = prompt_ids.iter().map(|&t| i64::from(t)).collect();
    let mut stream = Streamer::new(&tok, &prompt_ids, &a.stop, &opts.eos, &mut out);
    let generated = generate(model, &ids, &opts, |t| stream.push(t));
    let stats = stream.finish()?;
    let generated = generated?;
    let eos_ended = generated.last().is_some_and(|t| opts.eos.contains(t));
    stats.report(prompt_ids.len(), &opts, eos_ended, "end of sequence");
    Ok(())
}

/// Writes generated text to `out` as ids come, holding back what could still become a stop
/// string, and times the generation.
pub struct Streamer<'a, W: Write> {
    tok: &'a Tokenizer,
    /// Ids the text continues: decoding them with the new ids and dropping their text keeps
    /// word boundaries that tokenizers with a leading-space marker lose decoding new ids alone.
    context: &'a [u32],
    context_text: String,
    eos: &'a [i64],
    stream: TextStream,
    ids: Vec<u32>,
    out: W,
    failure: Option<anyhow::Error>,
    start: Instant,
    first: Option<f64>,
    generated: usize,
}

/// What a finished [`Streamer`] measured.
pub struct StreamStats {
    generated: usize,
    elapsed: f64,
    first: f64,
    stopped: bool,
}

impl<'a, W: Write> Streamer<'a, W> {
    /// A streamer of text continuing `context` (empty for a chat reply).
    pub fn new(
        tok: &'a Tokenizer,
        context: &'a [u32],
        stops: &[String],
        eos: &'a [i64],
        out: W,
    ) -> Self {
        Streamer {
            tok,
            context,
            context_text: tok.decode(context).unwrap_or_default(),
            eos,
            stream: TextStream::new(stops),
            ids: Vec::new(),
            out,
            failure: None,
            start: Instant::now(),
            first: None,
            generated: 0,
        }
    }

    fn decode(&self) -> anyhow::Result<String> {
        if self.context.is_empty() {
            return Ok(self.tok.decode(&self.ids)?);
        }
        let all: Vec<u32> = self.context.iter().chain(&self.ids).copied().collect();
        let full = self.tok.decode(&all)?;
        Ok(match full.strip_prefix(&self.context_text) {
            Some(rest) => rest.to_string(),
            None => self.tok.decode(&self.ids)?,
        })
    }

    /// Takes the next id; `false` when generation should stop (a stop string, or a failed
    /// write, kept for [`Streamer::finish`]). Stop ids are counted but not printed.
    pub fn push(&mut self, t: i64) -> bool {
        self.first
            .get_or_insert_with(|| self.start.elapsed().as_secs_f64());
        self.generated += 1;
        if self.eos.contains(&t) {
            return false;
        }
        // The options' vocab_limit keeps ids within the tokenizer's range.
        self.ids.push(t as u32);
        let piece = self.decode().map(|text| self.stream.push(&text));
        let written = piece.and_then(|p| {
            self.out.write_all(p.as_bytes())?;
            Ok(self.out.flush()?)
        });
        match written {
            Ok(()) => !self.stream.stopped(),
            Err(e) => {
                self.failure = Some(e);
                false
            }
        }
    }

    /// Writes what was held back and returns the timings, or the write error that stopped
    /// generation.
    pub fn finish(mut self) -> anyhow::Result<StreamStats> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let rest = self.stream.finish(&self.decode()?);
        self.out.write_all(rest.as_bytes())?;
        self.out.flush()?;
        Ok(StreamStats {
            generated: self.generated,
            elapsed,
            first: self.first.unwrap_or(elapsed),
            stopped: self.stream.stopped(),
        })
    }
}

impl StreamStats {
    /// Tokens per second overall and after the first token (decode alone), and why
    /// generation stopped (`eos_ended`: a stop id ended it, named `eos_name`), on stderr.
    pub fn report(&self, prompt: usize, opts: &GenerateOptions, eos_ended: bool, eos_name: &str) {
        let n = self.generated;
        let decode_rate = if n > 1 {
            (n - 1) as f64 / (self.elapsed - self.first).max(1e-9)
        } else {
            0.0
        };
        let why = if self.stopped {
            "stop string"
        } else if eos_ended {
            eos_name
        } else {
            "length"
        };
        eprintln!(
            "\n{n} tokens in {:.3} s ({:.1} tokens/s; first token after {:.1} ms for {prompt} prompt tokens, then {decode_rate:.1} tokens/s; {}; stopped on {why})",
            self.elapsed,
            n as f64 / self.elapsed.max(1e-9),
            self.first * 1e3,
            if opts.use_cache { "KV cache" } else { "no cache" },
        );
    }
}
