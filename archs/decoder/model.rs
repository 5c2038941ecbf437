//! The decoder's modules and forward pass: one block layout with the parts each family has or
//! lacks (fused projections, q/k norms, sandwich norms), declared once and taken, visited and
//! run from the same tables.
use super::config::{Activation, DecoderConfig};
use super::rope::Rope;
use super::Layout;
use crate::arch::modules::refuse_leftovers;
use crate::arch::{Bias, DeclaredModule, ModuleDecl, Modules};
use crate::error::{OctetError, Result};
use crate::model::{AttentionOptions, CausalLm, Context, LayerCache, ModelInfo, Packing};
use crate::nn::float::LayerNorm;
use crate::nn::rmsnorm::RmsNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

const EMBED_TOKENS: &str = "model.embed_tokens";
const NORM: &str = "model.norm";
const LM_HEAD: &str = "lm_head";

fn block_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// A block's projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proj {
    Q,
    K,
    V,
    Qkv,
    O,
    Gate,
    Up,
    GateUp,
    Down,
}

impl Proj {
    const ALL: [Proj; 9] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::Qkv,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::GateUp,
        Proj::Down,
    ];

    fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::Qkv => "self_attn.qkv_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::GateUp => "mlp.gate_up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    fn present(self, l: &Layout) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => !l.fused_qkv,
            Proj::Qkv => l.fused_qkv,
            Proj::Gate | Proj::Up => !l.fused_gate_up,
            Proj::GateUp => l.fused_gate_up,
            Proj::O | Proj::Down => true,
        }
    }

    /// `[out, in]`.
    fn shape(self, c: &DecoderConfig) -> Vec<usize> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Proj::Q => vec![c.q_width(), d],
            Proj::K | Proj::V => vec![c.kv_width(), d],
            Proj::Qkv => vec![c.q_width() + 2 * c.kv_width(), d],
            Proj::O => vec![d, c.q_width()],
            Proj::Gate | Proj::Up => vec![i, d],
            Proj::GateUp => vec![2 * i, d],
            Proj::Down => vec![d, i],
        }
    }

    fn bias(self, l: &Layout, c: &DecoderConfig) -> Bias {
        let rule = match self {
            Proj::Q | Proj::K | Proj::V | Proj::Qkv => l.qkv_bias,
            Proj::O => l.o_bias,
            _ => l.mlp_bias,
        };
        rule.resolve(c)
    }
}

/// A block's norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Norm {
    Input,
    PostAttention,
    PreFeedforward,
    PostFeedforward,
    Q,
    K,
}

impl Norm {
    const ALL: [Norm; 6] = [
        Norm::Input,
        Norm::PostAttention,
        Norm::PreFeedforward,
        Norm::PostFeedforward,
        Norm::Q,
        Norm::K,
    ];

    fn path(self) -> &'static str {
        match self {
            Norm::Input => "input_layernorm",
            Norm::PostAttention => "post_attention_layernorm",
            Norm::PreFeedforward => "pre_feedforward_layernorm",
            Norm::PostFeedforward => "post_feedforward_layernorm",
            Norm::Q => "self_attn.q_norm",
            Norm::K => "self_attn.k_norm",
        }
    }

    fn present(self, l: &Layout) -> bool {
        match self {
            Norm::Input | Norm::PostAttention => true,
            Norm::PreFeedforward | Norm::PostFeedforward => l.sandwich_norms,
            Norm::Q | Norm::K => l.qk_norm,
        }
    }

    fn dim(self, c: &DecoderConfig) -> usize {
        match self {
            Norm::Q | Norm::K => c.head_dim,
            _ => c.hidden_size,
        }
    }
}

/// One block: its projections and norms by slot (absent slots are `None`).
struct Block {
    proj: [Option<Box<dyn Layer>>; 9],
    norm: [Option<RmsNorm>; 6],
}

fn block_modules(l: &Layout, c: &DecoderConfig, prefix: &str) -> Vec<ModuleDecl> {
    let norms = Norm::ALL
        .into_iter()
        .filter(|n| n.present(l))
        .map(|n| ModuleDecl::norm(format!("{prefix}.{}", n.path()), n.dim(c)));
    let projs = Proj::ALL.into_iter().filter(|p| p.present(l)).map(|p| {
        ModuleDecl::layer(format!("{prefix}.{}", p.path()), p.shape(c)).with_bias(p.bias(l, c))
    });
    norms.chain(projs).collect()
}

impl Block {
    fn take(layers: &mut LayerMap, l: &Layout, c: &DecoderConfig, prefix: &str) -> Result<Self> {
        let mut proj: [Option<Box<dyn Layer>>; 9] = Default::default();
        for (slot, p) in proj.iter_mut().zip(Proj::ALL) {
            if p.present(l) {
                let path = format!("{prefix}.{}", p.path());
                *slot = Some(<Box<dyn Layer>>::take(layers, &path, &p.shape(c), 0.0)?);
            }
        }
        let mut norm: [Option<RmsNorm>; 6] = Default::default();
        for (slot, n) in norm.iter_mut().zip(Norm::ALL) {
            if n.present(l) {
                let path = format!("{prefix}.{}", n.path());
                let mut rms = RmsNorm::take(layers, &path, &[n.dim(c)], c.rms_norm_eps)?;
                rms.unit_offset = l.unit_offset_norms;
                *slot = Some(rms);
            }
        }
        Ok(Block { proj, norm })
    }

    fn proj(&self, p: Proj) -> Result<&dyn Layer> {
        self.proj[p as usize]
            .as_deref()
            .ok_or_else(|| OctetError::Architecture(format!("block has no {}", p.path())))
    }

    fn norm(&self, n: Norm) -> Option<&RmsNorm> {
        self.norm[n as usize].as_ref()
    }

    fn apply_norm(&self, n: Norm, x: Tensor) -> Result<Tensor> {
        match self.norm(n) {
            Some(norm) => norm.forward(&x),
            None => Ok(x),
        }
    }

    fn visit_layers(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        for (slot, p) in self.proj.iter_mut().zip(Proj::ALL) {
            if let Some(layer) = slot {
                f(&format!("{prefix}.{}", p.path()), layer);
            }
        }
    }

    fn visit_norms(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (slot, n) in self.norm.iter_mut().zip(Norm::ALL) {
            if let Some(norm) = slot {
                f(&format!("{prefix}.{}", n.path()), &mut norm.params);
            }
        }
    }
}

/// Every module of a decoder, as the config implies, in a checkpoint holding modules `has`:
/// `lm_head` is left out for tied embeddings with no separate head stored.
pub fn modules(l: &Layout, cfg: &DecoderConfig, has: &dyn Fn(&str) -> bool) -> Modules {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(EMBED_TOKENS, vec![v, d]));
    for i in 0..cfg.num_hidden_layers {
        out.extend(block_modules(l, cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::norm(NORM, d));
    if !cfg.tie_word_embeddings || has(LM_HEAD) {
        out.push(ModuleDecl::layer(LM_HEAD, vec![v, d]));
    }
    out
}

/// A Llama-style decoder model.
pub struct Decoder {
    cfg: DecoderConfig,
    layout: Layout,
    kind: Kind,
    embed_tokens: Box<dyn Layer>,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens`.
    lm_head: Option<Box<dyn Layer>>,
    rope: Rope,
}

impl Decoder {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(
        cfg: DecoderConfig,
        layout: Layout,
        layers: &mut LayerMap,
        kind: Kind,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let top = modules(&layout, &cfg, &|p| layers.remaining().contains(&p));
        let embed_tokens: Box<dyn Layer> = top.take(layers, EMBED_TOKENS, eps)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::take(layers, &layout, &cfg, &block_prefix(i)))
            .collect::<Result<_>>()?;
        let mut norm: RmsNorm = top.take(layers, NORM, eps)?;
        norm.unit_offset = layout.unit_offset_norms;
        let lm_head = if top.get(LM_HEAD).is_some() {
            Some(top.take(layers, LM_HEAD, eps)?)
        } else {
            crate::nn::tied::check_can_tie(EMBED_TOKENS, embed_tokens.as_ref())?;
            None
        };
        refuse_leftovers(layers, layout.name)?;
        let rope = Rope::new(&cfg.rope);
        Ok(Decoder {
            cfg,
            layout,
            kind,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            rope,
        })
    }

    fn device(&self) -> Device {
        self.norm.params.weight.device()
    }

    /// q, k, v `[B, heads, T, head_dim]` before the rotation.
    fn qkv(&self, b: &Block, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (bs, t) = (h.size()[0], h.size()[1]);
        let c = &self.cfg;
        let hd = c.head_dim as i64;
        let (q, k, v) = if self.layout.fused_qkv {
            let qkv = b.proj(Proj::Qkv)?.forward(h)?;
            let (qw, kw) = (c.q_width() as i64, c.kv_width() as i64);
            (
                qkv.narrow(2, 0, qw),
                qkv.narrow(2, qw, kw),
                qkv.narrow(2, qw + kw, kw),
            )
        } else {
            (
                b.proj(Proj::Q)?.forward(h)?,
                b.proj(Proj::K)?.forward(h)?,
                b.proj(Proj::V)?.forward(h)?,
            )
        };
        // Views [B, T, heads, head_dim]: q/k norms act on each head.
        let split = |x: Tensor| x.reshape([bs, t, -1, hd]);
        let q = b.apply_norm(Norm::Q, split(q))?.transpose(1, 2);
        let k = b.apply_norm(Norm::K, split(k))?.transpose(1, 2);
        Ok((q, k, split(v).transpose(1, 2)))
    }

    fn attention(&self, i: usize, b: &Block, h: &Tensor, at: Context) -> Result<Tensor> {
        let (bs, t) = (h.size()[0], h.size()[1]);
        let (q, k, v) = self.qkv(b, h)?;
        let (q, k) = self
            .rope
            .apply_at(&q, &k, &at.position_ids(t, q.device()), at.span(t));
        let c = &self.cfg;
        let opts = AttentionOptions {
            scale: Some(c.attention_scale),
            gqa: c.num_key_value_heads != c.num_attention_heads,
            window: c.windows[i].map(|w| w as i64),
            softcap: c.attn_logit_softcapping,
        };
        let out = at.attend(&q, k, v, opts);
        b.proj(Proj::O)?
            .forward(&out.transpose(1, 2).reshape([bs, t, c.q_width() as i64]))
    }

    fn block_at(&self, i: usize, h: &Tensor, at: Context) -> Result<Tensor> {
        let b = &self.blocks[i];
        let input = b.apply_norm(Norm::Input, h.shallow_clone())?;
        let attn = self.attention(i, b, &input, at)?;
        // Llama-style: post_attention_layernorm normalises the MLP's input; with sandwich norms
        // (Gemma 2) it normalises the attention output and pre_feedforward the MLP's input.
        let h = if self.layout.sandwich_norms {
            let h = h + b.apply_norm(Norm::PostAttention, attn)?;
            let m = self.mlp(b, &b.apply_norm(Norm::PreFeedforward, h.shallow_clone())?)?;
            h + b.apply_norm(Norm::PostFeedforward, m)?
        } else {
            let h = h + attn;
            let m = self.mlp(b, &b.apply_norm(Norm::PostAttention, h.shallow_clone())?)?;
            h + m
        };
        Ok(h)
    }

    fn mlp(&self, b: &Block, h: &Tensor) -> Result<Tensor> {
        let (gate, up) = if self.layout.fused_gate_up {
            let both = b.proj(Proj::GateUp)?.forward(h)?;
            let i = self.cfg.intermediate_size as i64;
            (both.narrow(-1, 0, i), both.narrow(-1, i, i))
        } else {
            (
                b.proj(Proj::Gate)?.forward(h)?,
                b.proj(Proj::Up)?.forward(h)?,
            )
        };
        let gate = match self.cfg.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
            Activation::Gelu => gate.gelu("none"),
        };
        b.proj(Proj::Down)?.forward(&(gate * up))
    }
}

/// `cap · tanh(x / cap)`.
fn softcap(x: Tensor, cap: Option<f64>) -> Tensor {
    match cap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    }
}

impl CausalLm for Decoder {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.rope.context(),
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
        let h = crate::model::embed_ids(self.embed_tokens.as_ref(), ids, self.device(), self.kind)?;
        Ok(if self.layout.scaled_embedding {
            // Gemma: √hidden rounded to the activations' dtype first, as transformers does.
            let scale = Tensor::from((self.cfg.hidden_size as f64).sqrt() as f32)
                .to_kind(self.kind)
                .to_device(h.device());
            h * scale
        } else {
            h
        })
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        self.block_at(i, h, Context::Cached(cache))
    }
    fn block_packed(&self, i: usize, h: &Tensor, packing: &Packing) -> Result<Tensor> {
        self.block_at(i, h, Context::Packed(packing))
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => crate::nn::tied::tied_logits(self.embed_tokens.as_ref(), &x)?,
        };
        Ok(softcap(
            logits.to_kind(Kind::Float),
            self.cfg.final_logit_softcapping,
        ))
    }
    fn head_input(&self, h: &Tensor) -> Result<Option<(Tensor, String)>> {
        let head = if self.lm_head.is_some() {
            LM_HEAD
        } else {
            EMBED_TOKENS
        };
        Ok(Some((self.norm.forward(h)?, head.to_string())))
    }
    fn cache_reset_at(&self) -> Option<i64> {
        self.cfg.rope.cache_reset_at()
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
