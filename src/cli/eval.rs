//! `octet eval`: sliding-window perplexity of a model (optionally with an adapter) on a text
//! file, optionally beside a second model on the same tokens.
use super::parse_device;
use anyhow::{bail, Context};
use octet::eval::{check_window, perplexity, Perplexity};
use octet::infer::load_for_inference;
use octet::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    source: super::ModelArgs,
    /// Text file, tokenized whole (no BOS).
    #[arg(long)]
    data: PathBuf,
    /// Window length [default: the model's max positions].
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
}

/// Tokens of `text` under `dir`'s tokenizer, as model ids (BOS first where the tokenizer adds
/// one, as transformers does).
fn tokenize(dir: &Path, text: &str) -> anyhow::Result<Vec<i64>> {
    let tok = Tokenizer::from_dir(dir)?;
    Ok(tok
        .encode_with_bos(text)?
        .into_iter()
        .map(i64::from)
        .collect())
}

/// The token ids of the evaluation file under the model's tokenizer; a `--compare` model
/// must tokenize it the same way, or the perplexities are not comparable.
fn read_ids(a: &Args) -> anyhow::Result<Vec<i64>> {
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    if text.is_empty() {
        bail!("{}: the evaluation file is empty", a.data.display());
    }
    let tokens = |dir: &Path| -> anyhow::Result<Vec<i64>> {
        let mut ids = tokenize(dir, &text)?;
        ids.truncate(a.max_tokens.unwrap_or(usize::MAX));
        Ok(ids)
    };
    let ids = tokens(&a.source.model)?;
    if let Some(c) = &a.compare {
        let has_tokenizer = c.join("tokenizer.json").is_file() || c.join("vocab.json").is_file();
        if has_tokenizer && tokens(c)? != ids {
            bail!(
                "{} and {} tokenize the text differently; their perplexities are not comparable",
                a.source.model.display(),
                c.display()
            );
        }
    }
    Ok(ids)
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.source.model = octet::hub::resolve_model(&a.source.model)?;
    a.compare = a
        .compare
        .as_deref()
        .map(octet::hub::resolve_model)
        .transpose()?;
    octet::model::check_model_path(&a.source.model)?;
    let load = a
        .source
        .load
        .load_options(parse_device(&a.source.load.device)?)?;
    let ids = read_ids(&a)?;
    let m = load_for_inference(&a.source.model, a.source.adapter.as_deref(), &load)?;
    let max_pos = m.model.info().max_positions;
    let ctx = a.ctx.unwrap_or(max_pos);
    let stride = a.stride.unwrap_or(ctx);
    check_window(ctx, stride, max_pos, ids.len())
        .with_context(|| format!("evaluating {}", a.source.model.display()))?;
    let base = perplexity(m.model.as_ref(), &ids, ctx, stride, a.batch_size)?;
    drop(m);
    let compare = match &a.compare {
        Some(c) => {
            let m = load_for_inference(c, None, &load)?;
            let r = perplexity(m.model.as_ref(), &ids, ctx, stride, a.batch_size)
                .with_context(|| format!("evaluating {}", c.display()))?;
            Some((c.clone(), r))
        }
        None => None,
    };
    if a.json {
        print_json(&a.source.model, &base, compare.as_ref());
    } else {
        print_text(&a.source.model, &base, compare.as_ref());
    }
    Ok(())
}

fn print_json(model: &Path, base: &Perplexity, compare: Option<&(PathBuf, Perplexity)>) {
    let mut v = serde_json::json!({
        "model": model.display().to_string(),
        "perplexity": base.perplexity,
        "nll": base.nll,
        "tokens": base.tokens,
        "ctx": base.ctx,
        "stride": base.stride,
        "windows": base.windows,
    });
    if let Some((c, r)) = compare {
        v["compare"] = serde_json::json!({
            "model": c.display().to_string(),
            "perplexity": r.perplexity,
            "nll": r.nll,
            "tokens": r.tokens,
            "relative_diff": relative(r, base),
        });
    }
    println!("{v}");
}

fn print_text(model: &Path, base: &Perplexity, compare: Option<&(PathBuf, Perplexity)>) {
    let line = |name: &Path, r: &Perplexity| {
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
    if let Some((c, r)) = compare {
        line(c, r);
        println!(
            "relative difference {:+.4}% ((compare - model) / model)",
            100.0 * relative(r, base)
        );
    }
}

/// (other - base) / base of the perplexities.
fn relative(other: &Perplexity, base: &Perplexity) -> f64 {
    (other.perplexity - base.perplexity) / base.perplexity
}
