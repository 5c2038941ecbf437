//! The Llama forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::LlamaConfig;
use crate::arch::modules::refuse_leftovers;
use crate::arch::{Bias, ModuleDecl, Modules};
use crate::error::{OctetError, Result};
use crate::model::{CausalLm, LayerCache, ModelInfo};
use crate::nn::float::LayerNorm;
use crate::nn::rmsnorm::RmsNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

crate::declare_block! {
    /// One Llama block: every module it has, with the shape its config implies and the
    /// config flag that gives its projections a bias.
    struct Block(c: &LlamaConfig) {
        input_layernorm: RmsNorm = "input_layernorm" [c.hidden_size],
        q_proj: Box<dyn Layer> = "self_attn.q_proj" [c.q_width(), c.hidden_size] bias attention_bias(c),
        k_proj: Box<dyn Layer> = "self_attn.k_proj" [c.kv_width(), c.hidden_size] bias attention_bias(c),
        v_proj: Box<dyn Layer> = "self_attn.v_proj" [c.kv_width(), c.hidden_size] bias attention_bias(c),
        o_proj: Box<dyn Layer> = "self_attn.o_proj" [c.hidden_size, c.q_width()] bias attention_bias(c),
        post_attention_layernorm: RmsNorm = "post_attention_layernorm" [c.hidden_size],
        gate_proj: Box<dyn Layer> = "mlp.gate_proj" [c.intermediate_size, c.hidden_size] bias mlp_bias(c),
        up_proj: Box<dyn Layer> = "mlp.up_proj" [c.intermediate_size, c.hidden_size] bias mlp_bias(c),
        down_proj: Box<dyn Layer> = "mlp.down_proj" [c.hidden_size, c.intermediate_size] bias mlp_bias(c),
    }
}

fn attention_bias(c: &LlamaConfig) -> Bias {
    Bias::Config {
        key: "attention_bias",
        set: c.attention_bias,
    }
}

fn mlp_bias(c: &LlamaConfig) -> Bias {
    Bias::Config {
        key: "mlp_bias",
        set: c.mlp_bias,
    }
}

const EMBED_TOKENS: &str = "model.embed_tokens";
const NORM: &str = "model.norm";
const LM_HEAD: &str = "lm_head";

fn block_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// A Llama model.
pub struct Llama {
    cfg: LlamaConfig,
    kind: Kind,
    embed_tokens: Box<dyn Layer>,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens`.
    lm_head: Option<Box<dyn Layer>>,
    /// `[head_dim / 2]` f32 rotary inverse frequencies.
    inv_freq: Tensor,
}

/// Every module of a Llama, as the config implies, in a checkpoint holding modules `has`:
/// `lm_head` is left out for tied embeddings with no separate head stored (a tied checkpoint
/// may still carry a copy of it; some exporters write both).
pub fn modules(cfg: &LlamaConfig, has: &dyn Fn(&str) -> bool) -> Modules {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(EMBED_TOKENS, vec![v, d]));
    for i in 0..cfg.num_hidden_layers {
        out.extend(Block::modules(cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::norm(NORM, d));
    if !cfg.tie_word_embeddings || has(LM_HEAD) {
        out.push(ModuleDecl::layer(LM_HEAD, vec![v, d]));
    }
    out
}

impl Llama {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: LlamaConfig, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let top = modules(&cfg, &|p| layers.remaining().contains(&p));
        let embed_tokens: Box<dyn Layer> = top.take(layers, EMBED_TOKENS, eps)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::take(layers, &cfg, &block_prefix(i), eps))
            .collect::<Result<_>>()?;
        let norm = top.take(layers, NORM, eps)?;
        let lm_head = if top.get(LM_HEAD).is_some() {
            Some(top.take(layers, LM_HEAD, eps)?)
        } else {
            check_tied_embedding(embed_tokens.as_ref())?;
            None
        };
        refuse_leftovers(layers, "Llama")?;
        let inv_freq = inv_freq(cfg.head_dim(), cfg.rope_theta());
        Ok(Llama {
            cfg,
            kind,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    fn device(&self) -> Device {
        self.norm.params.weight.device()
    }

    /// Rotates `x` `[B, heads, T, head_dim]` whose first position is `start` (HF's
    /// `rotate_half` convention: the two halves of each head form the pairs).
    fn apply_rotary(&self, x: &Tensor, start: i64) -> Tensor {
        let (t, hd) = (x.size()[2], x.size()[3]);
        let dev = x.device();
        let pos = Tensor::arange_start(start, start + t, (Kind::Float, dev));
        let freqs = pos.unsqueeze(1) * self.inv_freq.to_device(dev).unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).reshape([1, 1, t, hd]);
        let (cos, sin) = (emb.cos(), emb.sin());
        let xf = x.to_kind(Kind::Float);
        let half = hd / 2;
        let rotated = Tensor::cat(&[-xf.narrow(3, half, half), xf.narrow(3, 0, half)], 3);
        (xf * cos + rotated * sin).to_kind(x.kind())
    }

    fn attention(&self, b: &Block, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let (bs, t) = (h.size()[0], h.size()[1]);
        let hd = self.cfg.head_dim() as i64;
        let (nh, nkv) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.kv_heads() as i64,
        );
        let past = cache.as_ref().map_or(0, |c| c.len());
        let heads = |x: Tensor, n: i64| x.view([bs, t, n, hd]).transpose(1, 2);
        let q = self.apply_rotary(&heads(b.q_proj.forward(h)?, nh), past);
        let k = self.apply_rotary(&heads(b.k_proj.forward(h)?, nkv), past);
        let v = heads(b.v_proj.forward(h)?, nkv);
        // The cache keeps only the kv heads; attention shares each among nh / nkv queries.
        let out = crate::model::cached_causal_attention(&q, k, v, cache, None, nkv != nh);
        b.o_proj
            .forward(&out.transpose(1, 2).reshape([bs, t, nh * hd]))
    }

    fn mlp(&self, b: &Block, h: &Tensor) -> Result<Tensor> {
        let gate = b.gate_proj.forward(h)?.silu();
        b.down_proj.forward(&(gate * b.up_proj.forward(h)?))
    }
}

/// HF's default rope: `1 / theta^(2j / head_dim)` in f32.
fn inv_freq(head_dim: usize, theta: f64) -> Tensor {
    let exponent = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / head_dim as f64;
    Tensor::pow_scalar(theta, &exponent).reciprocal()
}

/// Refuses an embedding kind whose table the tied head cannot read.
fn check_tied_embedding(layer: &dyn Layer) -> Result<()> {
    if crate::nn::tied::can_tie(layer) {
        Ok(())
    } else {
        Err(OctetError::InvalidArgument(format!(
            "tied LM head: model.embed_tokens is a {}, whose table cannot serve as the head",
            layer.kind()
        )))
    }
}

impl CausalLm for Llama {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.max_position_embeddings,
            hidden: self.cfg.hidden_size,
            blocks: self.cfg.num_hidden_layers,
        }
    }
    fn compute_kind(&self) -> Kind {
        self.kind
    }
    fn set_compute_kind(&mut self, kind: Kind) {
        self.kind = kind;
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .embed_tokens
            .forward(&ids.f_to_device(self.device())?)?
            .to_kind(self.kind))
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let b = &self.blocks[i];
        let h = h + self.attention(b, &b.input_layernorm.forward(h)?, cache)?;
        let m = self.mlp(b, &b.post_attention_layernorm.forward(&h)?)?;
        Ok(h + m)
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => crate::nn::tied::tied_logits(self.embed_tokens.as_ref(), &x)?,
        };
        Ok(logits.to_kind(Kind::Float))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(EMBED_TOKENS, &mut self.embed_tokens);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_layers(&block_prefix(i), f);
        }
        if let Some(head) = &mut self.lm_head {
            f(LM_HEAD, head);
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_norms(&block_prefix(i), f);
        }
        f(NORM, &mut self.norm.params);
    }
}
