//! `octet eval`: sliding-window perplexity of a model (optionally with an adapter) on a text
//! file, or its perplexity on the trained tokens of chat, instruction or prompt/completion
//! records; optionally beside a second model on the same tokens.
use anyhow::{bail, Context};
use octet::eval::{
    check_window, divergence, perplexity, record_perplexity, Divergence, Perplexity,
};
use octet::infer::load_for_inference;
use octet::model::CausalLm;
use octet::tokenizer::Tokenizer;
use octet::train::data::{load_sequences_with, template_for, DataFormat, ReadOptions, Sequence};
use std::path::{Path, PathBuf};

/// Flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    source: super::ModelArgs,
    /// Text file (tokenized whole, scored in sliding windows), or JSON Lines records in any
    /// format train reads (each record scored on its own, on the tokens training takes its
    /// loss on: a conversation's assistant turns, a completion).
    #[arg(long)]
    data: PathBuf,
    /// Data format: auto, text, jsonl, jsonl:FIELD, prompt-completion, chat, sharegpt, alpaca.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Chat template (a Jinja file) instead of the model's own, for conversational records.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Score every token of a conversation, as `train --train-on-prompt` trains on it.
    #[arg(long)]
    train_on_prompt: bool,
    /// Window length; for records, the longest record kept (longer ones are cut)
    /// [default: the model's max positions].
    #[arg(long)]
    ctx: Option<usize>,
    /// Tokens between window starts; only the new tokens of each window are scored
    /// [default: --ctx, i.e. disjoint windows].
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first K tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Windows of equal length run together.
    #[arg(long, default_value_t = 8, value_parser = super::at_least(1))]
    batch_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Second model (folder, GGUF file or cache id) evaluated on the same tokens.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// With --compare on a text file: also the KL divergence of the second model's
    /// next-token distributions from the first's and how often their top tokens agree (both
    /// models are held in memory at once).
    #[arg(long, requires = "compare")]
    kl: bool,
}

/// What is scored: one token stream in sliding windows, or records one to a row.
#[derive(PartialEq)]
enum Inputs {
    Stream(Vec<i64>),
    Records(Vec<Sequence>),
}

impl Inputs {
    fn score(&self, model: &dyn CausalLm, a: &Args) -> anyhow::Result<Perplexity> {
        Ok(match self {
            Inputs::Stream(ids) => {
                let max_pos = model.info().max_positions;
                let ctx = a.ctx.unwrap_or(max_pos);
                let stride = a.stride.unwrap_or(ctx);
                check_window(ctx, stride, max_pos, ids.len())?;
                perplexity(model, ids, ctx, stride, a.batch_size)?
            }
            Inputs::Records(records) => record_perplexity(model, records, a.batch_size)?,
        })
    }
}

/// The evaluation data under `dir`'s tokenizer (and chat template, for conversations): text
/// as model ids (BOS first where the tokenizer adds one, as transformers does), records as
/// training reads them.
fn read_inputs(
    a: &Args,
    dir: &Path,
    format: &DataFormat,
    seq_len: usize,
) -> anyhow::Result<Inputs> {
    let tok = Tokenizer::from_dir(dir)?;
    if *format == DataFormat::Text {
        let text = std::fs::read_to_string(&a.data)
            .with_context(|| format!("reading {}", a.data.display()))?;
        if text.is_empty() {
            bail!("{}: the evaluation file is empty", a.data.display());
        }
        let mut ids: Vec<i64> = tok
            .encode_with_bos(&text)?
            .into_iter()
            .map(i64::from)
            .collect();
        ids.truncate(a.max_tokens.unwrap_or(usize::MAX));
        return Ok(Inputs::Stream(ids));
    }
    let template = template_for(&[format], dir, a.chat_template.as_deref(), &tok)?;
    let read = ReadOptions {
        format: Some(format),
        template: template.as_ref(),
        train_on_prompt: a.train_on_prompt,
        drop_long: false,
    };
    let (records, stats) = load_sequences_with(&a.data, &tok, seq_len, &read)?;
    if stats.truncated > 0 {
        eprintln!(
            "warning: {} of {} records are longer than {seq_len} tokens and were cut",
            stats.truncated, stats.documents
        );
    }
    Ok(Inputs::Records(records))
}

/// The evaluation data under the model's tokenizer, records cut at `seq_len` tokens; a
/// `--compare` model must read it the same way, or the perplexities are not comparable.
fn read_all(a: &Args, format: &DataFormat, seq_len: usize) -> anyhow::Result<Inputs> {
    let inputs = read_inputs(a, &a.source.model, format, seq_len)?;
    if let Some(c) = &a.compare {
        let has_tokenizer = c.join("tokenizer.json").is_file() || c.join("vocab.json").is_file();
        if has_tokenizer && read_inputs(a, c, format, seq_len)? != inputs {
            bail!(
                "{} and {} tokenize the data differently; their perplexities are not comparable",
                a.source.model.display(),
                c.display()
            );
        }
    }
    Ok(inputs)
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.source.model = octet::hub::resolve_model(&a.source.model)?;
    a.compare = a
        .compare
        .as_deref()
        .map(octet::hub::resolve_model)
        .transpose()?;
    octet::model::check_model_path(&a.source.model)?;
    let load = a.source.load_options()?;
    // The data file is looked at before the (possibly long) model load; records are read
    // after it, cut at the model's positions.
    let format = match a.format.as_str() {
        "auto" => DataFormat::detect(&a.data)?,
        f => f.parse()?,
    };
    let m = a.source.load_model(&load)?;
    let seq_len = a.ctx.unwrap_or(m.model.info().max_positions);
    let inputs = read_all(&a, &format, seq_len)?;
    let base = inputs
        .score(m.model.as_ref(), &a)
        .with_context(|| format!("evaluating {}", a.source.model.display()))?;
    let reference = if a.kl {
        Some(m)
    } else {
        drop(m);
        None
    };
    let compare = match &a.compare {
        Some(c) => {
            let m = load_for_inference(c, None, &load)?;
            let r = inputs
                .score(m.model.as_ref(), &a)
                .with_context(|| format!("evaluating {}", c.display()))?;
            let kl = match (&reference, &inputs) {
                (None, _) => None,
                (Some(reference), Inputs::Stream(ids)) => Some(divergence(
                    reference.model.as_ref(),
                    m.model.as_ref(),
                    ids,
                    base.ctx,
                    base.stride,
                    a.batch_size,
                )?),
                (Some(_), Inputs::Records(_)) => {
                    bail!("{}: --kl compares text files only", a.data.display())
                }
            };
            Some(Compared {
                model: c.clone(),
                perplexity: r,
                kl,
            })
        }
        None => None,
    };
    let records = matches!(inputs, Inputs::Records(_));
    if a.json {
        print_json(&a.source.model, &base, compare.as_ref(), records);
    } else {
        print_text(&a.source.model, &base, compare.as_ref(), records);
    }
    Ok(())
}

/// The `--compare` model's results.
struct Compared {
    model: PathBuf,
    perplexity: Perplexity,
    kl: Option<Divergence>,
}

/// `records`: `windows` counts records and `ctx` is the longest one.
fn print_json(model: &Path, base: &Perplexity, compare: Option<&Compared>, records: bool) {
    let mut v = serde_json::json!({
        "model": model.display().to_string(),
        "perplexity": base.perplexity,
        "nll": base.nll,
        "tokens": base.tokens,
        "ctx": base.ctx,
        "stride": base.stride,
        "windows": base.windows,
        "records": records,
    });
    if let Some(c) = compare {
        let r = &c.perplexity;
        v["compare"] = serde_json::json!({
            "model": c.model.display().to_string(),
            "perplexity": r.perplexity,
            "nll": r.nll,
            "tokens": r.tokens,
            "relative_diff": relative(r, base),
        });
        if let Some(kl) = &c.kl {
            v["compare"]["kl"] = serde_json::json!(kl);
        }
    }
    println!("{v}");
}

fn print_text(model: &Path, base: &Perplexity, compare: Option<&Compared>, records: bool) {
    let line = |name: &Path, r: &Perplexity| {
        if records {
            println!(
                "{}: perplexity {:.4} (nll {:.6} nats/token over the {} trained tokens of {} \
                 records, the longest {} tokens)",
                name.display(),
                r.perplexity,
                r.nll,
                r.tokens,
                r.windows,
                r.ctx
            );
            return;
        }
        println!(
            "{}: perplexity {:.4} (nll {:.6} nats/token over {} tokens; ctx {}, stride {}, {} windows)",
            name.display(),
            r.perplexity,
            r.nll,
            r.tokens,
            r.ctx,
            r.stride,
            r.windows
        )
    };
    line(model, base);
    if let Some(c) = compare {
        line(&c.model, &c.perplexity);
        println!(
            "relative difference {:+.4}% ((compare - model) / model)",
            100.0 * relative(&c.perplexity, base)
        );
        if let Some(kl) = &c.kl {
            println!(
                "KL divergence (model ‖ compare) {:.3e} nats/token mean, {:.3e} max; same top \
                 token on {:.2}% of {} tokens",
                kl.kl_mean,
                kl.kl_max,
                100.0 * kl.top1_agreement,
                kl.tokens
            );
        }
    }
}

/// (other - base) / base of the perplexities.
fn relative(other: &Perplexity, base: &Perplexity) -> f64 {
    (other.perplexity - base.perplexity) / base.perplexity
}
