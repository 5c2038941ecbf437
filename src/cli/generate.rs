//! `octet generate`: continue a prompt, streaming the text to stdout as tokens come.
//!
//! stdout carries exactly the prompt followed by the continuation (no trailing newline);
//! everything else (seed, notes, tokens/s) goes to stderr.
use anyhow::{bail, Context};
use octet::generate::{generate, model_eos_ids, room, GenerateOptions, TextStream};
use octet::infer::load_for_inference;
use octet::model::CausalLm;
use octet::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Flags.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_file"])))]
pub struct Args {
    #[command(flatten)]
    source: super::ModelArgs,
    /// Prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// File whose whole contents (trailing newline included) are the prompt.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Most tokens to add (fewer if the model's positions run out).
    #[arg(long, default_value_t = 64, value_parser = super::at_least(1))]
    max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Sample only among the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens that reach probability P (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Penalize tokens already in the sequence (Hugging Face semantics; 1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Sampling seed [default: drawn from the clock and printed on stderr].
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the continuation contains this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Recompute the whole sequence every step instead of keeping a KV cache.
    #[arg(long)]
    no_cache: bool,
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

/// The sampling options of the flags for `model` and its tokenizer: the seed (drawn from the
/// clock unless given), the end-of-sequence ids, and the vocabulary rows text can decode to.
fn sampling(a: &Args, model: &dyn CausalLm, tok: &Tokenizer) -> GenerateOptions {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut eos = Vec::new();
    if !a.ignore_eos {
        eos = model_eos_ids(&a.source.model);
        if let Some(e) = tok.eos_id() {
            eos.push(i64::from(e));
        }
        eos.dedup();
    }
    // A model vocabulary padded beyond the tokenizer's has rows no text decodes to.
    let tok_vocab = tok.vocab_size();
    let vocab_limit = (tok_vocab < model.info().vocab_size).then_some(tok_vocab);
    GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed,
        eos,
        use_cache: !a.no_cache,
        vocab_limit,
    }
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.source.model = octet::hub::resolve_model(&a.source.model)?;
    let device = super::parse_device(&a.source.load.device)?;
    let prompt = read_prompt(&a)?;
    octet::model::check_model_path(&a.source.model)?;
    let tok = Tokenizer::from_dir(&a.source.model)?;
    let prompt_ids: Vec<u32> = tok.encode_with_bos(&prompt)?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let m = load_for_inference(
        &a.source.model,
        a.source.adapter.as_deref(),
        &a.source.load.load_options(device)?,
    )?;
    let model = m.model.as_ref();
    let opts = sampling(&a, model, &tok);
    opts.validate()?;
    let budget = room(model, prompt_ids.len(), a.max_new_tokens)?;
    if budget < a.max_new_tokens {
        eprintln!(
            "note: {} prompt tokens leave room for {budget} new tokens (the model takes {} positions)",
            prompt_ids.len(),
            model.info().max_positions
        );
    }
    if a.temperature > 0.0 {
        eprintln!("seed {}", opts.seed);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    stream_continuation(&a, model, &tok, &prompt_ids, &opts, &mut out)
}

/// Generates and writes the continuation as it comes, then reports speed and why it stopped
/// on stderr.
fn stream_continuation(
    a: &Args,
    model: &dyn CausalLm,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let eos = &opts.eos;
    let ids: Vec<i64> = prompt_ids.iter().map(|&t| i64::from(t)).collect();
    let prompt_text = tok.decode(prompt_ids)?;
    let mut stream = TextStream::new(&a.stop);
    let mut continuation: Vec<u32> = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    // Decoding prompt + continuation and dropping the prompt's text keeps word boundaries
    // that tokenizers with a leading-space marker would lose decoding the continuation alone.
    let decode = |gen: &[u32]| -> anyhow::Result<String> {
        let all: Vec<u32> = prompt_ids.iter().chain(gen).copied().collect();
        let full = tok.decode(&all)?;
        Ok(match full.strip_prefix(&prompt_text) {
            Some(rest) => rest.to_string(),
            None => tok.decode(gen)?,
        })
    };
    let start = Instant::now();
    let mut first: Option<f64> = None;
    let generated = generate(model, &ids, opts, |t| {
        first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if eos.contains(&t) {
            return false;
        }
        // vocab_limit keeps ids within the tokenizer's range.
        continuation.push(t as u32);
        let mut emit = || -> anyhow::Result<()> {
            let piece = stream.push(&decode(&continuation)?);
            out.write_all(piece.as_bytes())?;
            Ok(out.flush()?)
        };
        match emit() {
            Ok(()) => !stream.stopped(),
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let first = first.unwrap_or(elapsed);
    let rest = stream.finish(&decode(&continuation)?);
    out.write_all(rest.as_bytes())?;
    out.flush()?;

    let why = if stream.stopped() {
        "stop string"
    } else if generated.last().is_some_and(|t| eos.contains(t)) {
        "end of sequence"
    } else {
        "length"
    };
    report_speed(a, generated.len(), prompt_ids.len(), elapsed, first, why);
    Ok(())
}

/// Tokens per second overall and after the first token (decode alone), on stderr.
fn report_speed(a: &Args, n: usize, prompt: usize, elapsed: f64, first: f64, why: &str) {
    let decode_rate = if n > 1 {
        (n - 1) as f64 / (elapsed - first).max(1e-9)
    } else {
        0.0
    };
    eprintln!(
        "\n{n} tokens in {elapsed:.3} s ({:.1} tokens/s; first token after {:.1} ms for {prompt} prompt tokens, then {decode_rate:.1} tokens/s; {}; stopped on {why})",
        n as f64 / elapsed.max(1e-9),
        first * 1e3,
        if a.no_cache { "no cache" } else { "KV cache" },
    );
}
