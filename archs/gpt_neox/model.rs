//! The GPT-NeoX forward pass over octet layers (float or 8-bit, with or without adapters).
use super::config::GptNeoxConfig;
use crate::arch::modules::refuse_leftovers;
use crate::arch::{ModuleDecl, Modules};
use crate::error::Result;
use crate::model::{CausalLm, Context, LayerCache, ModelInfo, Packing};
use crate::nn::float::LayerNorm;
use crate::nn::{Layer, LayerMap};
use tch::{Device, Kind, Tensor};

crate::declare_block! {
    /// One GPT-NeoX block: every module it has, with the shape its config implies.
    struct Block(c: &GptNeoxConfig) {
        input_layernorm: LayerNorm = "input_layernorm" [c.hidden_size],
        post_attention_layernorm: LayerNorm = "post_attention_layernorm" [c.hidden_size],
        query_key_value: Box<dyn Layer> = "attention.query_key_value" [3 * c.hidden_size, c.hidden_size],
        dense: Box<dyn Layer> = "attention.dense" [c.hidden_size, c.hidden_size],
        dense_h_to_4h: Box<dyn Layer> = "mlp.dense_h_to_4h" [c.intermediate_size, c.hidden_size],
        dense_4h_to_h: Box<dyn Layer> = "mlp.dense_4h_to_h" [c.hidden_size, c.intermediate_size],
    }
}

const EMBED_IN: &str = "gpt_neox.embed_in";
const FINAL_LAYER_NORM: &str = "gpt_neox.final_layer_norm";

fn block_prefix(i: usize) -> String {
    format!("gpt_neox.layers.{i}")
}

/// A GPT-NeoX model (`GPTNeoXForCausalLM`: Pythia, GPT-NeoX-20B).
pub struct GptNeox {
    cfg: GptNeoxConfig,
    kind: Kind,
    embed_in: Box<dyn Layer>,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
    /// The head under its stored name (`embed_out`, or transformers 5's `lm_head`); `None`
    /// when the head is tied to `gpt_neox.embed_in`.
    head: Option<(&'static str, Box<dyn Layer>)>,
    /// `[max_positions, rotary_dims]` f32 tables, each half repeated (rotate_half layout).
    sin: Tensor,
    cos: Tensor,
}

/// Every module of a GPT-NeoX, as the config implies, in a checkpoint holding modules `has`
/// (the head is stored under one of two names, or not at all when tied).
pub fn modules(cfg: &GptNeoxConfig, has: &dyn Fn(&str) -> bool) -> Modules {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = Modules::new();
    out.push(ModuleDecl::layer(EMBED_IN, vec![v, d]));
    for i in 0..cfg.num_hidden_layers {
        out.extend(Block::modules(cfg, &block_prefix(i)));
    }
    out.push(ModuleDecl::norm(FINAL_LAYER_NORM, d));
    if let Some(h) = head_name(cfg, has) {
        out.push(ModuleDecl::layer(h, vec![v, d]));
    }
    out
}

/// The head's module name in a checkpoint holding modules `has`: Pythia checkpoints (and
/// `save_pretrained`) say `embed_out`, a transformers 5 state dict says `lm_head`; `None`
/// for a tied head stored nowhere (a tied checkpoint may still carry a copy of it).
fn head_name(cfg: &GptNeoxConfig, has: &dyn Fn(&str) -> bool) -> Option<&'static str> {
    if has("lm_head") {
        Some("lm_head")
    } else if has("embed_out") || !cfg.tie_word_embeddings {
        Some("embed_out")
    } else {
        None
    }
}

/// HF's default rotary tables: angle(p, j) = p / base^(2j / rd), both halves repeated.
fn rotary_tables(positions: usize, rd: usize, base: f64) -> (Tensor, Tensor) {
    let cpu = Device::Cpu;
    let exponent = Tensor::arange_start_step(0, rd as i64, 2, (Kind::Int64, cpu))
        .to_kind(Kind::Float)
        / rd as f64;
    let inv_freq = Tensor::pow_scalar(base, &exponent).reciprocal();
    let freqs =
        Tensor::arange(positions as i64, (Kind::Float, cpu)).unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.sin(), emb.cos())
}

impl GptNeox {
    /// Assembles the model from built layers, checking every shape against the config.
    pub fn new(cfg: GptNeoxConfig, layers: &mut LayerMap, kind: Kind) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let has = |p: &str| layers.remaining().contains(&p);
        let (top, head_name) = (modules(&cfg, &has), head_name(&cfg, &has));
        let embed_in: Box<dyn Layer> = top.take(layers, EMBED_IN, eps)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::take(layers, &cfg, &block_prefix(i), eps))
            .collect::<Result<_>>()?;
        let final_layer_norm = top.take(layers, FINAL_LAYER_NORM, eps)?;
        let head = if let Some(name) = head_name {
            Some((name, top.take(layers, name, eps)?))
        } else {
            crate::nn::tied::check_can_tie(EMBED_IN, embed_in.as_ref())?;
            None
        };
        refuse_leftovers(layers, "GPT-NeoX")?;
        let (sin, cos) = rotary_tables(
            cfg.max_position_embeddings,
            cfg.rotary_dims(),
            cfg.rotary_base(),
        );
        Ok(GptNeox {
            cfg,
            kind,
            embed_in,
            blocks,
            final_layer_norm,
            head,
            sin,
            cos,
        })
    }

    fn device(&self) -> Device {
        self.final_layer_norm.weight.device()
    }

    /// Rotates the leading `rotary_dims` of each head of `x` `[B, heads, T, head_dim]` at the
    /// positions `at` gives (HF's rotate_half convention: the halves pair up).
    fn apply_rotary(&self, x: &Tensor, at: &Context) -> Tensor {
        let rd = self.cfg.rotary_dims() as i64;
        if rd == 0 {
            return x.shallow_clone();
        }
        let (t, hd) = (x.size()[2], x.size()[3]);
        // [1 or B, 1, T, rd]
        let table = |tab: &Tensor| {
            at.table_rows(tab, t)
                .to_device(x.device())
                .to_kind(x.kind())
                .unsqueeze(1)
        };
        let (sin, cos) = (table(&self.sin), table(&self.cos));
        let rot = x.narrow(3, 0, rd);
        let half = rd / 2;
        let rotated = Tensor::cat(&[-rot.narrow(3, half, half), rot.narrow(3, 0, half)], 3);
        let out = rot * cos + rotated * sin;
        if rd == hd {
            out
        } else {
            Tensor::cat(&[out, x.narrow(3, rd, hd - rd)], 3)
        }
    }

    fn attention(&self, b: &Block, x: &Tensor, at: Context) -> Result<Tensor> {
        let (bs, t) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.head_dim() as i64,
        );
        // query_key_value's output is laid out per head: [heads, (q, k, v), head_dim].
        let qkv = b
            .query_key_value
            .forward(x)?
            .f_view([bs, t, nh, 3 * hd])?
            .permute([0, 2, 1, 3]);
        let q = self.apply_rotary(&qkv.narrow(3, 0, hd), &at);
        let k = self.apply_rotary(&qkv.narrow(3, hd, hd), &at);
        let v = qkv.narrow(3, 2 * hd, hd);
        let out = at.attend(&q, k, v, Default::default());
        b.dense
            .forward(&out.permute([0, 2, 1, 3]).reshape([bs, t, nh * hd]))
    }

    fn block_at(&self, i: usize, h: &Tensor, at: Context) -> Result<Tensor> {
        let b = &self.blocks[i];
        let attn = self.attention(b, &b.input_layernorm.forward(h)?, at)?;
        Ok(if self.cfg.use_parallel_residual {
            let m = self.mlp(b, &b.post_attention_layernorm.forward(h)?)?;
            m + attn + h
        } else {
            let a = attn + h;
            let m = self.mlp(b, &b.post_attention_layernorm.forward(&a)?)?;
            m + a
        })
    }

    fn mlp(&self, b: &Block, x: &Tensor) -> Result<Tensor> {
        let x = b.dense_h_to_4h.forward(x)?;
        let x = match self.cfg.hidden_act.as_str() {
            "gelu" => x.gelu("none"),
            "relu" => x.relu(),
            // gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh approximation.
            _ => x.gelu("tanh"),
        };
        b.dense_4h_to_h.forward(&x)
    }
}

impl CausalLm for GptNeox {
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
        crate::model::embed_ids(self.embed_in.as_ref(), ids, self.device(), self.kind)
    }
    fn block(&self, i: usize, h: &Tensor, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        self.block_at(i, h, Context::Cached(cache))
    }
    fn block_packed(&self, i: usize, h: &Tensor, packing: &Packing) -> Result<Tensor> {
        self.block_at(i, h, Context::Packed(packing))
    }
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.final_layer_norm.forward(h)?;
        let logits = match &self.head {
            Some((_, head)) => head.forward(&x)?,
            None => crate::nn::tied::tied_logits(self.embed_in.as_ref(), &x)?,
        };
        Ok(logits.to_kind(Kind::Float))
    }
    fn head_input(&self, h: &Tensor) -> Result<Option<(Tensor, String)>> {
        let head = self.head.as_ref().map_or(EMBED_IN, |(name, _)| name);
        Ok(Some((self.final_layer_norm.forward(h)?, head.to_string())))
    }
    fn visit_layers(&mut self, f: &mut dyn FnMut(&str, &mut Box<dyn Layer>)) {
        f(EMBED_IN, &mut self.embed_in);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_layers(&block_prefix(i), f);
        }
        if let Some((name, head)) = &mut self.head {
            f(name, head);
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(&str, &mut LayerNorm)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_norms(&block_prefix(i), f);
        }
        f(FINAL_LAYER_NORM, &mut self.final_layer_norm);
    }
}
