//! Perplexity of a causal LM over a token stream, with the sliding window of Hugging Face's
//! "Perplexity of fixed-length models" guide.
//!
//! Windows of `ctx` tokens start every `stride` tokens; each window scores only the tokens
//! that no earlier window scored (the overlap is labelled -100 and serves as context), so
//! every token after the first is scored exactly once, with at most `ctx - 1` and, once the
//! first window is past, at least `ctx - stride` tokens of context.
//!
//! The guide accumulates `mean window loss × (labelled tokens - 1)`, which is exact only when
//! windows do not overlap: with an overlap, the first labelled token of a window does get a
//! prediction, so that window has one more scored token than the guide counts. Here the
//! per-token negative log-likelihoods are summed and counted exactly:
//! `ppl = exp(Σ scored NLL / number of scored tokens)`.
//!
//! Records (chat, instruction and prompt/completion data) are scored one record to a row, on
//! the tokens training takes its loss on ([`record_perplexity`]).
use crate::error::{OctetError, Result};
use crate::model::CausalLm;
use crate::train::data::Sequence;
use crate::train::step::{causal_lm_nll, IGNORE_INDEX};
use tch::Tensor;

/// One window of the sliding-window evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First token of the window (inclusive).
    pub begin: usize,
    /// One past the last token of the window.
    pub end: usize,
    /// How many trailing tokens of the window carry labels (the rest is context only).
    pub labelled: usize,
}

/// The windows Hugging Face's guide visits for `n` tokens, `ctx` tokens each, started every
/// `stride` tokens; the last one ends at `n`. Expects `1 ≤ stride ≤ ctx`.
pub fn windows(n: usize, ctx: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n && stride > 0 {
        let end = (begin + ctx).min(n);
        out.push(Window {
            begin,
            end,
            labelled: end - prev_end,
        });
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Consecutive runs `(i, j)` of `wins[i..j]` that can share a batch: at most `batch`, all of
/// one length (the last window may be shorter).
fn window_batches(wins: &[Window], batch: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < wins.len() {
        let len = wins[i].end - wins[i].begin;
        let mut j = i + 1;
        while j < wins.len() && j - i < batch.max(1) && wins[j].end - wins[j].begin == len {
            j += 1;
        }
        out.push((i, j));
        i = j;
    }
    out
}

/// The input ids and labels (context positions [`IGNORE_INDEX`]) of equal-length windows, row
/// after row, and their length.
fn window_rows(ids: &[i64], wins: &[Window]) -> (Vec<i64>, Vec<i64>, usize) {
    let len = wins[0].end - wins[0].begin;
    let mut input = Vec::with_capacity(wins.len() * len);
    let mut labels = Vec::with_capacity(wins.len() * len);
    for w in wins {
        let window = &ids[w.begin..w.end];
        input.extend_from_slice(window);
        let context = len - w.labelled.min(len);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, context));
        labels.extend_from_slice(&window[context..]);
    }
    (input, labels, len)
}

/// Result of [`perplexity`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Sum of the scored tokens' negative log-likelihoods.
    pub nll_sum: f64,
    /// Number of scored tokens.
    pub tokens: usize,
    /// Window length used.
    pub ctx: usize,
    /// Stride used.
    pub stride: usize,
    /// Number of windows evaluated.
    pub windows: usize,
}

/// Checks `ctx`/`stride` against each other, the model and the token count.
pub fn check_window(
    ctx: usize,
    stride: usize,
    max_positions: usize,
    n_tokens: usize,
) -> Result<()> {
    if ctx < 2 {
        return Err(OctetError::InvalidArgument(format!(
            "--ctx {ctx}: a window needs at least 2 tokens"
        )));
    }
    if ctx > max_positions {
        return Err(OctetError::InvalidArgument(format!(
            "--ctx {ctx} is larger than the model's {max_positions} positions"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(OctetError::InvalidArgument(format!(
            "--stride {stride} must be between 1 and --ctx ({ctx})"
        )));
    }
    if n_tokens < 2 {
        return Err(OctetError::InvalidArgument(format!(
            "the evaluation text has {n_tokens} token(s); at least 2 are needed to score one"
        )));
    }
    Ok(())
}

/// Perplexity of `model` over `ids` with windows of `ctx` tokens every `stride` tokens.
/// Windows of equal length are run `batch` at a time (the result does not depend on it
/// beyond float rounding). The caller puts the model in inference mode (no dropout).
pub fn perplexity(
    model: &dyn CausalLm,
    ids: &[i64],
    ctx: usize,
    stride: usize,
    batch: usize,
) -> Result<Perplexity> {
    let info = model.info();
    check_window(ctx, stride, info.max_positions, ids.len())?;
    crate::model::check_token_ids(ids, info.vocab_size, "the evaluation text")?;
    let wins = windows(ids.len(), ctx, stride);
    let device = crate::model::model_device(model)?;
    let (mut nll_sum, mut scored) = (0.0f64, 0i64);
    for (i, j) in window_batches(&wins, batch) {
        let (input, labels, len) = window_rows(ids, &wins[i..j]);
        let (s, n) = batch_nll(model, device, &input, &labels, [(j - i) as i64, len as i64])?;
        if !s.is_finite() {
            let (first, last) = (&wins[i], &wins[j - 1]);
            return Err(OctetError::InvalidArgument(format!(
                "the loss is {s} in window{} {}{} (tokens {}..{}): the model's outputs are not \
                 finite there, so there is no perplexity to report",
                if j - i > 1 { "s" } else { "" },
                i + 1,
                if j - i > 1 {
                    format!("-{j}")
                } else {
                    String::new()
                },
                first.begin,
                last.end
            )));
        }
        nll_sum += s;
        scored += n;
    }
    if scored == 0 {
        return Err(OctetError::InvalidArgument(
            "no token was scored (the text is too short for these windows)".into(),
        ));
    }
    Ok(Perplexity::new(nll_sum, scored, ctx, stride, wins.len()))
}

impl Perplexity {
    /// From the summed NLL of `scored` (> 0) tokens.
    fn new(nll_sum: f64, scored: i64, ctx: usize, stride: usize, windows: usize) -> Self {
        let nll = nll_sum / scored as f64;
        Perplexity {
            perplexity: nll.exp(),
            nll,
            nll_sum,
            tokens: scored as usize,
            ctx,
            stride,
            windows,
        }
    }
}

/// Summed NLL and scored-token count of one batch of rows (`shape` = rows × length).
fn batch_nll(
    model: &dyn CausalLm,
    device: tch::Device,
    input: &[i64],
    labels: &[i64],
    shape: [i64; 2],
) -> Result<(f64, i64)> {
    let input = Tensor::from_slice(input).reshape(shape).to_device(device);
    let labels = Tensor::from_slice(labels).reshape(shape);
    crate::nn::scratch::inference(|| -> Result<_> {
        Ok(causal_lm_nll(&model.forward(&input)?, &labels))
    })
}

/// Perplexity of `model` over the labelled tokens of `records` (training's sequences: the
/// assistant tokens of a conversation, a completion after its prompt): each record runs as
/// one row, cut after its last labelled token, so no record sees another. Rows are batched
/// `batch` at a time in order of length; a row's right padding is never seen by its tokens
/// (causal attention) and carries no label. In the result, `ctx` is the longest row and
/// `windows` the number of records.
pub fn record_perplexity(
    model: &dyn CausalLm,
    records: &[Sequence],
    batch: usize,
) -> Result<Perplexity> {
    let info = model.info();
    let device = crate::model::model_device(model)?;
    let span = |s: &Sequence| {
        s.labels
            .iter()
            .rposition(|&l| l != IGNORE_INDEX)
            .map_or(0, |i| i + 1)
    };
    let mut order: Vec<(usize, &Sequence)> = records
        .iter()
        .map(|s| (span(s), s))
        .filter(|&(n, _)| n >= 2)
        .collect();
    order.sort_by_key(|&(n, _)| n);
    let longest = order.last().map_or(0, |&(n, _)| n);
    if longest > info.max_positions {
        return Err(OctetError::InvalidArgument(format!(
            "a record of {longest} tokens is longer than the model's {} positions",
            info.max_positions
        )));
    }
    let (mut nll_sum, mut scored) = (0.0f64, 0i64);
    for rows in order.chunks(batch.max(1)) {
        let len = rows.last().map_or(0, |&(n, _)| n);
        let (mut input, mut labels) = (Vec::new(), Vec::new());
        for (_, s) in rows {
            crate::model::check_token_ids(&s.input_ids[..len], info.vocab_size, "the records")?;
            input.extend_from_slice(&s.input_ids[..len]);
            labels.extend_from_slice(&s.labels[..len]);
        }
        let (s, n) = batch_nll(
            model,
            device,
            &input,
            &labels,
            [rows.len() as i64, len as i64],
        )?;
        if !s.is_finite() {
            return Err(OctetError::InvalidArgument(format!(
                "the loss is {s} on records of {len} tokens: the model's outputs are not finite \
                 there, so there is no perplexity to report"
            )));
        }
        nll_sum += s;
        scored += n;
    }
    if scored == 0 {
        return Err(OctetError::InvalidArgument(
            "no token was scored (no record has a labelled token after its first)".into(),
        ));
    }
    Ok(Perplexity::new(
        nll_sum,
        scored,
        longest,
        longest,
        order.len(),
    ))
}

/// How far a second model's next-token distributions are from a reference model's, over the
/// tokens [`perplexity`] scores (the measure llama.cpp's perplexity tool reports for quantized
/// models: far less noisy than a difference of perplexities, which two equally accurate
/// roundings can move by tenths of a percent).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Divergence {
    /// Mean KL(reference ‖ other) per scored token, nats.
    pub kl_mean: f64,
    /// The largest per-token KL.
    pub kl_max: f64,
    /// Share of scored tokens where both models rank the same next token first.
    pub top1_agreement: f64,
    /// Scored tokens.
    pub tokens: usize,
}

/// [`Divergence`] of `other` from `reference` on the windows of [`perplexity`]; both models
/// must share a vocabulary and be loaded at once (each batch runs through both).
pub fn divergence(
    reference: &dyn CausalLm,
    other: &dyn CausalLm,
    ids: &[i64],
    ctx: usize,
    stride: usize,
    batch: usize,
) -> Result<Divergence> {
    let (ra, rb) = (reference.info(), other.info());
    if ra.vocab_size != rb.vocab_size {
        return Err(OctetError::InvalidArgument(format!(
            "the models' vocabularies differ ({} and {} rows): no divergence to compare",
            ra.vocab_size, rb.vocab_size
        )));
    }
    check_window(
        ctx,
        stride,
        ra.max_positions.min(rb.max_positions),
        ids.len(),
    )?;
    crate::model::check_token_ids(ids, ra.vocab_size, "the evaluation text")?;
    let wins = windows(ids.len(), ctx, stride);
    let (da, db) = (
        crate::model::model_device(reference)?,
        crate::model::model_device(other)?,
    );
    let (mut kl_sum, mut kl_max, mut agree, mut scored) = (0.0f64, 0.0f64, 0i64, 0i64);
    for (i, j) in window_batches(&wins, batch) {
        let (input, labels, len) = window_rows(ids, &wins[i..j]);
        let shape = [(j - i) as i64, len as i64];
        let input = Tensor::from_slice(&input).reshape(shape);
        // Position t predicts token t + 1: it counts where that token is scored.
        let scored_at = Tensor::from_slice(&labels)
            .reshape(shape)
            .narrow(1, 1, len as i64 - 1)
            .ne(IGNORE_INDEX);
        let logits = |m: &dyn CausalLm, d: tch::Device| -> Result<Tensor> {
            let out = crate::nn::scratch::inference(|| m.forward(&input.to_device(d)))?;
            Ok(out.narrow(1, 0, len as i64 - 1).to_device(tch::Device::Cpu))
        };
        let (a, b) = (logits(reference, da)?, logits(other, db)?);
        // In f64 one row at a time: a batch of rows × positions × vocabulary in f64 would be
        // gigabytes for a real vocabulary.
        for row in 0..(j - i) as i64 {
            let log_probs = |t: &Tensor| {
                t.get(row)
                    .to_kind(tch::Kind::Double)
                    .log_softmax(-1, tch::Kind::Double)
            };
            let (p, q) = (log_probs(&a), log_probs(&b));
            let at = scored_at.get(row);
            let kl = (p.exp() * (&p - &q))
                .sum_dim_intlist(-1, false, tch::Kind::Double)
                .masked_select(&at);
            if kl.numel() == 0 {
                continue;
            }
            let same = p.argmax(-1, false).eq_tensor(&q.argmax(-1, false));
            kl_sum += kl.sum(tch::Kind::Double).double_value(&[]);
            kl_max = kl_max.max(kl.max().double_value(&[]));
            agree += same
                .masked_select(&at)
                .sum(tch::Kind::Int64)
                .int64_value(&[]);
            scored += kl.numel() as i64;
        }
    }
    if scored == 0 || !kl_sum.is_finite() {
        return Err(OctetError::InvalidArgument(format!(
            "no divergence to report ({scored} scored tokens, KL sum {kl_sum})"
        )));
    }
    Ok(Divergence {
        kl_mean: kl_sum / scored as f64,
        kl_max,
        top1_agreement: agree as f64 / scored as f64,
        tokens: scored as usize,
    })
}
