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

    /// Full forward pass: logits `[B, T, vocab]` in f32.
    fn forward(&self, ids: &Tensor) -> Tensor {
        let mut h = self.embed(ids);
        for i in 0..self.info().blocks {
            h = self.block(i, &h, None);
        }
        self.head(&h)
    }
}
