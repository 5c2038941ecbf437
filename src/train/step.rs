//! One forward + backward pass of a causal LM, plain or with block-level recompute.
//!
//! With checkpointing, every block but the last runs first under no-grad and only its input
//! is kept; the last block, the head and the loss run with grad; then, block by block in
//! reverse, each earlier block is recomputed from its saved input with grad and the upstream
//! gradient is pushed through it as a vector-Jacobian product `(y · g).sum().backward()`
//! (libtorch from Rust cannot define custom autograd functions). Only one block's activations
//! and de-quantized weights are alive at a time. Dropout replays the same masks because each
//! block's forward is seeded the same way in both passes.
use crate::error::Result;
use crate::model::{CausalLm, Packing};
use tch::{Kind, Tensor};

/// Labels with this value carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy over labelled positions (labels are shifted here: position
/// t predicts label t+1, as in Hugging Face).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let v = logits.size()[2];
    let t = logits.size()[1];
    let pred = logits.narrow(1, 0, t - 1).reshape([-1, v]);
    let target = labels
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .to_device(logits.device());
    pred.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, IGNORE_INDEX, 0.0)
}

/// Positions that carry a loss in `labels` (`[batch, seq_len]`, unshifted): those after the
/// first with a label other than [`IGNORE_INDEX`].
pub fn labelled_positions(labels: &Tensor) -> i64 {
    let t = labels.size()[1];
    labels
        .narrow(1, 1, t - 1)
        .ne(IGNORE_INDEX)
        .sum(Kind::Int64)
        .int64_value(&[])
}

/// The weight of each micro-batch's mean loss in the step's loss, from the labelled
/// positions `n_m` of each of this rank's micro-batches `m` and the step's labelled positions
/// `total` over every micro-batch of every rank.
///
/// The step's loss is the mean over every labelled token of the step,
///
/// `L = (Σ_r Σ_m Σ_{t ∈ A_rm} ℓ_t) / N`, with `N = Σ_r Σ_m n_rm` and `n_rm = |A_rm|`,
///
/// not the mean of the micro-batches' (or the ranks') means. Each micro-batch computes its own
/// mean `L_rm = Σ_{t ∈ A_rm} ℓ_t / n_rm`, so its backward pass is scaled by `w_rm = n_rm / N`,
/// and `L = Σ_r Σ_m w_rm · L_rm`: the ranks' gradients are then summed, not averaged. With one
/// rank `N` is the local sum. A micro-batch without labelled positions gets weight 0 (and need
/// not run).
pub fn micro_batch_weights(counts: &[i64], total: i64) -> Vec<f64> {
    counts
        .iter()
        .map(|&n| {
            if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            }
        })
        .collect()
}

/// Sum of next-token negative log-likelihoods and the number of labelled positions.
pub fn causal_lm_nll(logits: &Tensor, labels: &Tensor) -> (f64, i64) {
    let v = logits.size()[2];
    let t = logits.size()[1];
    let pred = logits.narrow(1, 0, t - 1).reshape([-1, v]);
    let target = labels
        .narrow(1, 1, t - 1)
        .reshape([-1])
        .to_device(logits.device());
    let nll =
        pred.cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Sum, IGNORE_INDEX, 0.0);
    let n = target.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
    (nll.double_value(&[]), n)
}

/// Seeds libtorch's generator for block `block` of step `step`, so a recompute replays the
/// forward's dropout masks.
fn seed_block(seed: u64, step: u64, block: usize) {
    let mix = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (block as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB);
    tch::manual_seed((mix >> 1) as i64);
}

/// Runs forward and backward for one micro-batch, accumulating gradients into every trainable
/// tensor with `loss * loss_scale` as the objective. Returns the (unscaled) loss.
pub fn forward_backward(
    model: &dyn CausalLm,
    ids: &Tensor,
    labels: &Tensor,
    loss_scale: f64,
    checkpointing: bool,
    seed: u64,
    step: u64,
) -> Result<f64> {
    forward_backward_with(
        model,
        ids,
        labels,
        None,
        loss_scale,
        checkpointing,
        seed,
        step,
    )
}

/// [`forward_backward`] where, with `packing`, each row holds several records that are
/// computed as if alone.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward_with(
    model: &dyn CausalLm,
    ids: &Tensor,
    labels: &Tensor,
    packing: Option<&Packing>,
    loss_scale: f64,
    checkpointing: bool,
    seed: u64,
    step: u64,
) -> Result<f64> {
    let n = model.info().blocks;
    let block = |i: usize, h: &Tensor| match packing {
        Some(p) => model.block_packed(i, h, p),
        None => model.block(i, h, None),
    };
    if !checkpointing {
        let mut h = {
            seed_block(seed, step, usize::MAX);
            model.embed(ids)?
        };
        for i in 0..n {
            seed_block(seed, step, i);
            h = block(i, &h)?;
        }
        let loss = causal_lm_loss(&model.head(&h)?, labels);
        let value = loss.double_value(&[]);
        (loss * loss_scale).backward();
        return Ok(value);
    }
    // The embedding runs once, with grad: only when it carries an adapter does the gradient
    // have to reach block 0's input; otherwise block 0's recompute skips the input-gradient
    // products of its frozen layers, as plain autograd does.
    seed_block(seed, step, usize::MAX);
    let embedded = model.embed(ids)?;
    let embed_trainable = embedded.requires_grad();
    let needs_input_grad = |i: usize| i > 0 || embed_trainable;
    // The last block runs with grad straight away (its graph would be rebuilt first thing
    // in the backward pass anyway), so only blocks 0..n-1 run twice.
    let last = n.saturating_sub(1);
    // First pass: no graph, one reused de-quantization buffer per weight shape.
    let (mut saved, h) = crate::nn::scratch::inference(|| -> Result<_> {
        let mut h = embedded.detach();
        let mut saved = Vec::with_capacity(last);
        for i in 0..last {
            seed_block(seed, step, i);
            let next = block(i, &h)?;
            saved.push(h);
            h = next;
        }
        Ok((saved, h))
    })?;
    // Each backward below runs inside a recompute scope: the weights de-quantized for it come
    // from a pool and go back to it once its graph is freed.
    let (value, mut g) = crate::nn::scratch::recompute(|| -> Result<_> {
        let (x, y) = if n == 0 {
            let x = h.detach().set_requires_grad(embed_trainable);
            (x.shallow_clone(), x)
        } else {
            let x = h.detach().set_requires_grad(needs_input_grad(last));
            seed_block(seed, step, last);
            let y = block(last, &x)?;
            (x, y)
        };
        let loss = causal_lm_loss(&model.head(&y)?, labels);
        let value = loss.double_value(&[]);
        if loss.requires_grad() {
            (loss * loss_scale).backward();
        }
        Ok((value, x.grad()))
    })?;
    for i in (0..last).rev() {
        let x = saved
            .pop()
            .expect("one saved input per block")
            .detach()
            .set_requires_grad(needs_input_grad(i));
        g = crate::nn::scratch::recompute(|| -> Result<_> {
            seed_block(seed, step, i);
            let y = block(i, &x)?;
            if y.requires_grad() {
                (y * g.detach()).sum(Kind::Float).backward();
            }
            Ok(x.grad())
        })?;
    }
    if embed_trainable && g.defined() {
        (embedded * g.detach()).sum(Kind::Float).backward();
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_loss_is_the_mean_over_all_labelled_tokens() {
        tch::manual_seed(3);
        let logits = Tensor::randn([2, 5, 7], (Kind::Double, tch::Device::Cpu));
        let x = -100;
        // Row 0 has 3 predicted labels (positions 1..4), row 1 one.
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3, x, 4, x, x, x, 6]).reshape([2, 5]);
        // By hand: -log softmax(logits[b, t-1])[label[b, t]] over the labelled positions.
        let lsm = logits.log_softmax(-1, Kind::Double).flatten(0, -1);
        let lsm = Vec::<f64>::try_from(&lsm).unwrap();
        let lab = Vec::<i64>::try_from(&labels.flatten(0, -1)).unwrap();
        let mut nll = Vec::new();
        for b in 0..2 {
            for t in 1..5 {
                let label = lab[b * 5 + t];
                if label != x {
                    nll.push(-lsm[(b * 5 + t - 1) * 7 + label as usize]);
                }
            }
        }
        let by_hand = nll.iter().sum::<f64>() / nll.len() as f64;
        let mean_of_means = (nll[..3].iter().sum::<f64>() / 3.0 + nll[3]) / 2.0;
        assert!(
            (by_hand - mean_of_means).abs() > 1e-3,
            "the test tells them apart"
        );

        // Two micro-batches of one row each, weighted as the trainer weighs them.
        let leaf = logits.set_requires_grad(true);
        let rows: Vec<Tensor> = (0..2).map(|b| labels.narrow(0, b, 1)).collect();
        let counts: Vec<i64> = rows.iter().map(labelled_positions).collect();
        assert_eq!(counts, [3, 1]);
        let w = micro_batch_weights(&counts, counts.iter().sum());
        let mut step_loss = 0.0;
        for (b, row) in rows.iter().enumerate() {
            let l = causal_lm_loss(&leaf.narrow(0, b as i64, 1), row);
            step_loss += w[b] * l.double_value(&[]);
            (l * w[b]).backward();
        }
        assert!(
            (step_loss - by_hand).abs() < 1e-12,
            "{step_loss} vs {by_hand}"
        );
        // The gradient equals that of one batch holding both rows.
        let accumulated = leaf.grad().copy();
        let _ = leaf.grad().zero_();
        causal_lm_loss(&leaf, &labels).backward();
        let diff = (accumulated - leaf.grad()).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "{diff}");
        assert_eq!(micro_batch_weights(&[0, 0], 0), [0.0, 0.0]);
    }
}
