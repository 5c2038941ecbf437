//! What every architecture's model offers: embed, blocks, head — split so training can
//! recompute one block at a time and generation can keep a KV cache per block.
use crate::nn::float::LayerNorm;
use crate::nn::Layer;
use tch::{Kind, Tensor};

/// Sizes callers need to know.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    /// Vocabulary size (logit width).
    pub vocab_size: usize,
    /// Longest sequence the model takes.
    pub max_positions: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Number of blocks.
    pub blocks: usize,
}

/// Keys and values of one block for the positions seen so far.
#[derive(Default)]
pub struct LayerCache {
    /// `[B, heads, T, head_dim]`, if any positions are cached.
    pub k: Option<Tensor>,
    /// Same shape as `k`.
    pub v: Option<Tensor>,
}

impl LayerCache {
    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.k.as_ref().map_or(0, |k| k.size()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Causal attention over `[B, heads, T, head_dim]` tensors whose new positions follow any
/// cached ones: extends `cache` with `k`/`v`, then lets query i (absolute position past + i)
/// see keys up to its own position. `gqa` shares each key/value head among several query
/// heads; `scale` defaults to 1/√head_dim.
pub fn cached_causal_attention(
    q: &Tensor,
    mut k: Tensor,
    mut v: Tensor,
    cache: Option<&mut LayerCache>,
    scale: Option<f64>,
    gqa: bool,
) -> Tensor {
    let past = cache.as_ref().map_or(0, |c| c.len());
    if let Some(c) = cache {
        if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
            k = Tensor::cat(&[pk, &k], 2);
            v = Tensor::cat(&[pv, &v], 2);
        }
        c.k = Some(k.shallow_clone());
        c.v = Some(v.shallow_clone());
    }
    if past == 0 {
        return Tensor::scaled_dot_product_attention(
            q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            scale,
            gqa,
        );
    }
    let t = q.size()[2];
    let dev = q.device();
    let kpos = Tensor::arange(past + t, (Kind::Int64, dev)).unsqueeze(0);
    let qpos = (Tensor::arange(t, (Kind::Int64, dev)) + past).unsqueeze(1);
    let mask = kpos.le_tensor(&qpos);
    Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, scale, gqa)
}

/// A causal language model built by an architecture plugin.
pub trait CausalLm: Send {
    /// Its sizes.
    fn info(&self) -> ModelInfo;
    /// The dtype activations are computed in (f32 or bf16).
    fn compute_kind(&self) -> Kind;
    /// Changes the compute dtype.
    fn set_compute_kind(&mut self, kind: Kind);
    /// Token ids `[B, T]` to hidden states `[B, T, hidden]` in the compute dtype.
    fn embed(&self, ids: &Tensor) -> Tensor;
    /// Applies block `i`. With a cache, `h` holds only the new positions, which follow the
    /// cached ones, and the cache is extended.
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Tensor;
    /// Final norm and LM head: hidden states to f32 logits `[B, T, vocab]`.
    fn head(&self, h: &Tensor) -> Tensor;
    /// Visits every built layer with its module path (to attach adapters, move, inspect).
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>));
    /// Visits every normalisation layer with its module path (to train norms).
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm));

    /// Stores every frozen float weight in `kind`, the dtype it would be cast to on each call
    /// anyway (see [`Layer::store_frozen_in`]).
    fn store_frozen_in(&mut self, kind: Kind) {
        self.visit_layers(&mut |_, l| l.store_frozen_in(kind));
    }

    /// Full forward pass: logits `[B, T, vocab]` in f32.
    fn forward(&self, ids: &Tensor) -> Tensor {
        let mut h = self.embed(ids);
        for i in 0..self.info().blocks {
            h = self.block(i, &h, None);
        }
        self.head(&h)
    }
}
